"""A lab scenario for hunting tests: a process that changes on command.

`vmi-hunt` is a tiny static x86_64 program (hand-assembled like the marker
workload, shipped inside the scenario script as printf escapes, so the
lab's images stay as they are). It reads one byte at a time from its stdin,
a FIFO: `x` maps a new writable-and-executable page at RWX_VA and writes
code into it; `u` calls setresuid(1000, 1000, 1000). Nothing else changes
in the process, so a snapshot taken before shows exactly those facts after.

The scenario (for `vmishell lab up --init` or `up(..., init_script=...)`)
starts vmi-hunt, then reads words from the serial console, so a test steps
it at the moment it chooses (`send(name, word)`), never on a timer:

    hunt-spawn   start a new process (a sleep), printed as `@@vmi hunt spawned PID`
    hunt-rwx     vmi-hunt maps its RWX page
    hunt-uid     vmi-hunt drops to uid 1000

Each step prints `@@vmi hunt done WORD` on the console when it is done.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from vmishell.errors import LabError
from vmishell.lab.workload import _assemble, _Jump, _Label, _mov_imm, _u32, _xor_self

CODE_VA = 0x0040_0000
RWX_VA = 0x0700_0000
HUNT_UID = 1000
#: The bytes written into the RWX page (nop; nop; nop; ret).
RWX_CODE = b"\x90\x90\x90\xc3"
_EAX, _EDX, _ESI, _EDI = 0, 2, 6, 7
_JE, _JLE, _JMP = 0x74, 0x7E, 0xEB
_SYSCALL = b"\x0f\x05"


def _code() -> list:
    return [
        b"\x48\x83\xec\x10",  # sub rsp, 16             ; a one-byte buffer at [rsp]
        _Label("loop"),
        _xor_self(_EAX),  # SYS_read
        _xor_self(_EDI),  # fd 0
        b"\x48\x89\xe6",  # mov rsi, rsp
        _mov_imm(_EDX, 1),
        _SYSCALL,
        b"\x48\x85\xc0",  # test rax, rax
        _Jump(_JLE, "idle"),  # EOF or error: sleep forever
        b"\x0f\xb6\x04\x24",  # movzx eax, byte [rsp]
        b"\x3c" + b"x",  # cmp al, 'x'
        _Jump(_JE, "rwx"),
        b"\x3c" + b"u",  # cmp al, 'u'
        _Jump(_JE, "uid"),
        _Jump(_JMP, "loop"),
        _Label("rwx"),
        _mov_imm(_EAX, 9),  # SYS_mmap(RWX_VA, 4096, RWX, PRIVATE|ANONYMOUS|FIXED, -1, 0)
        _mov_imm(_EDI, RWX_VA),
        _mov_imm(_ESI, 0x1000),
        _mov_imm(_EDX, 7),
        b"\x41\xba" + _u32(0x32),  # mov r10d, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED
        b"\x41\xb8" + _u32(0xFFFFFFFF),  # mov r8d, -1
        b"\x45\x31\xc9",  # xor r9d, r9d
        _SYSCALL,
        b"\xc7\x04\x25" + _u32(RWX_VA) + RWX_CODE,  # mov dword [RWX_VA], code
        _Jump(_JMP, "loop"),
        _Label("uid"),
        _mov_imm(_EAX, 117),  # SYS_setresuid(HUNT_UID, HUNT_UID, HUNT_UID)
        _mov_imm(_EDI, HUNT_UID),
        _mov_imm(_ESI, HUNT_UID),
        _mov_imm(_EDX, HUNT_UID),
        _SYSCALL,
        _Jump(_JMP, "loop"),
        _Label("idle"),
        b"\x6a\x00",  # push 0                  ; struct timespec {1 s, 0 ns}
        b"\x6a\x01",  # push 1
        _Label("sleep"),
        _mov_imm(_EAX, 35),  # SYS_nanosleep(rsp, NULL)
        b"\x48\x89\xe7",  # mov rdi, rsp
        _xor_self(_ESI),
        _SYSCALL,
        _Jump(_JMP, "sleep"),
    ]


def build_hunt_program() -> bytes:
    """The static x86_64 ELF of vmi-hunt: one R+X segment and a non-executable stack."""
    ehsize, phentsize, phnum = 64, 56, 2
    start = ehsize + phentsize * phnum
    code = _assemble(_code())
    end = start + len(code)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        CODE_VA + start,
        ehsize,
        0,
        0,
        ehsize,
        phentsize,
        phnum,
        64,
        0,
        0,
    )
    load = struct.pack("<IIQQQQQQ", 1, 4 | 1, 0, CODE_VA, CODE_VA, end, end, 0x1000)
    stack = struct.pack("<IIQQQQQQ", 0x6474E551, 4 | 2, 0, 0, 0, 0, 0, 16)
    return ehdr + load + stack + code


def scenario_script() -> str:
    """The /vmi/scenario shell script (busybox sh) described in the module docstring."""
    octal = "".join(f"\\{b:03o}" for b in build_hunt_program())
    return f"""#!/bin/sh
# vmishell hunting scenario: vmi-hunt, then one step per word read from the console.
printf '{octal}' >/tmp/vmi-hunt
chmod 755 /tmp/vmi-hunt
mkfifo /run/hunt.fifo
/tmp/vmi-hunt <>/run/hunt.fifo &
printf '@@vmi hunt pid %s\\n' "$!"
stty -F /dev/ttyS0 -echo 2>/dev/null
exec 0</dev/ttyS0
while read -r word; do
	case "$word" in
	hunt-spawn) sleep 2147483646 & printf '@@vmi hunt spawned %s\\n' "$!" ;;
	hunt-rwx) printf x >/run/hunt.fifo ;;
	hunt-uid) printf u >/run/hunt.fifo ;;
	*) continue ;;
	esac
	sleep 1
	printf '@@vmi hunt done %s\\n' "$word"
done
"""


def write_scenario(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(scenario_script())
    return path


def hunt_lines(serial_log: str | Path) -> list[list[str]]:
    """The `@@vmi hunt ...` lines of a guest's serial log, as word lists."""
    try:
        text = Path(serial_log).read_text(errors="replace")
    except OSError as exc:
        raise LabError(f"cannot read {serial_log}: {exc}") from exc
    return [line.split()[2:] for line in text.splitlines() if line.startswith("@@vmi hunt ")]


def send(
    serial_sock: str | Path, serial_log: str | Path, word: str, timeout: float = 60
) -> list[str]:
    """Type `word` on the guest's serial console and wait for its `done` line.

    Returns the hunt lines printed meanwhile (e.g. `spawned PID`).
    """
    before = len(hunt_lines(serial_log))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(serial_sock))
        s.sendall(f"{word}\n".encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = hunt_lines(serial_log)[before:]
            if ["done", word] in lines:
                return [" ".join(w) for w in lines]
            time.sleep(0.2)
    raise LabError(f"the guest did not finish {word!r} within {timeout:g} s")


__all__ = [
    "HUNT_UID",
    "RWX_CODE",
    "RWX_VA",
    "build_hunt_program",
    "hunt_lines",
    "scenario_script",
    "send",
    "write_scenario",
]
