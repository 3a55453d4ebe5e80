"""Errors of a fleet sweep: what the errors frame says when a target gave no answer."""

from __future__ import annotations

from vmishell.errors import VmiError


class FleetError(VmiError):
    """A fleet could not be set up or asked (no cluster, bad targets, bad options)."""


class TargetTimeout(FleetError):
    """A target did not answer within the per-target timeout; its attach was killed."""


class WorkerLost(FleetError):
    """The worker (or sandbox process) running a target died, also on the retry."""


class OutputTooLarge(FleetError):
    """A target's answer was over the per-target byte bound and was dropped."""


__all__ = ["FleetError", "OutputTooLarge", "TargetTimeout", "WorkerLost"]
