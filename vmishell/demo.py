"""The README's main job: boot the x86_64 lab guest and look inside it.

Run as `python -m vmishell.demo [GUEST]`. It leaves the guest running so the
reader can go on (`vmishell ps GUEST`, IPython) and says how to stop it.
"""

from __future__ import annotations

import sys

from vmishell.errors import VmiError
from vmishell.frontends.text import hexdump, safe_text, walk_table


def main(argv: list[str] | None = None) -> int:
    from vmishell.lab import runner
    from vmishell.lab.workload import MARKER, layout
    from vmishell.session import Session

    args = sys.argv[1:] if argv is None else argv
    guest = args[0] if args else "x86_64"
    try:
        try:
            running = runner.attach(guest)
            print(f"lab guest {guest!r} is already running (pid {running.pid})")
        except VmiError:
            print(f"building and booting lab guest {guest!r} (first time: downloads ~75 MB)...")
            running = runner.up(guest)
        with Session.lab(running.name) as s:
            loc = s.guest.location
            print(
                f"attached: {s.profile.name}, {loc.arch}, {loc.mode.name} paging, "
                f"KASLR virtual shift {loc.virtual_shift:#x}\n"
            )
            df = s.processes(threads=False)
            cols = ["pid", "ppid", "uid", "state", "comm", "cmdline"]
            print(safe_text(df[cols].fillna("").to_string(index=False)))
            marker = df[df.comm == "vmi-marker"]
            if marker.empty:
                print("\nno vmi-marker process found", file=sys.stderr)
                return 1
            pid = int(marker.pid.iloc[0])
            va = layout(running.spec.arch).marker_va
            proc = s.process(pid)
            data = proc.read(va, 48)
            print(f"\nvmi-marker (pid {pid}) at {va:#x}:")
            print(hexdump(data, va))
            print("\n" + walk_table(proc.walk(va)))
            print("\nmarker found" if data.startswith(MARKER) else "\nMARKER NOT FOUND")
        print(f"\nThe guest keeps running: `vmishell ps {guest}`, `vmishell lab down {guest}`.")
        return 0 if data.startswith(MARKER) else 1
    except VmiError as exc:
        print(f"vmishell: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
