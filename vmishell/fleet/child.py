"""`python -m vmishell.fleet.child`: the sandbox process a fleet worker attaches through."""

from __future__ import annotations

from vmishell.fleet.sandbox import main

if __name__ == "__main__":
    main()
