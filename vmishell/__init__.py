"""vmishell: look inside running virtual machines from IPython and Jupyter."""

from __future__ import annotations

__version__ = "0.1.0"
