"""Monitoring a guest: watches of fields and addresses, snapshots, and what changed between them.

Like `vmishell.search`, it uses only the Session API; the magics and the
CLI are thin layers over it.
"""

from __future__ import annotations

from vmishell.monitor.watch import FieldWatch, changes, equals, outside, watch

__all__ = ["FieldWatch", "changes", "equals", "outside", "watch"]
