"""pahole, run on a -dbg vmlinux: detached BTF, and structure layouts from DWARF.

Debian's i386 kernels carry no BTF, so their types come from the -dbg
package's DWARF through `pahole --btf_encode_detached`. And pahole's own view
of the DWARF (`pahole -F dwarf -C a,b,c VMLINUX`, C with every member's
offset and size in comments) is the ground truth the tests hold every profile
against, whichever way its types were made. `parse_layouts` reads that view.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmishell.errors import LabError, MissingToolError

#: Structures vmishell reads (os/linux/layout.py and the Volatility plugins it runs).
LAYOUT_STRUCTS = (
    "task_struct", "list_head", "mm_struct", "vm_area_struct", "maple_tree", "maple_node",
    "maple_range_64", "maple_arange_64", "file", "path", "dentry", "qstr", "inode",
    "super_block", "mount", "vfsmount", "cred", "signal_struct", "kthread", "pid", "upid",
    "pid_namespace", "fs_struct", "files_struct", "fdtable", "mm_rss_stat", "pgprot",
)  # fmt: skip

_MEMBER = re.compile(
    r"^(?P<indent>\t+)(?P<decl>.*?);\s*/\*\s*(?P<off>\d+)(?::\s*(?P<bit>\d+))?\s+(?P<size>\d+)\s*\*/"
)
_ATTRIBUTE = re.compile(r"__attribute__\(\(.*?\)\)+")


def _pahole() -> str:
    exe = shutil.which("pahole")
    if exe is None:
        raise MissingToolError("pahole", "dwarves")
    return exe


def encode_btf(vmlinux: Path, btf: Path) -> Path:
    """`pahole --btf_encode_detached`: the BTF of a DWARF vmlinux, in its own file."""
    tmp = btf.with_name(f".{btf.name}.tmp")
    _run([_pahole(), f"--btf_encode_detached={tmp}", str(vmlinux)], f"BTF from {vmlinux.name}")
    os.replace(tmp, btf)
    return btf


def dwarf_layouts(vmlinux: Path, structs: Iterable[str] = LAYOUT_STRUCTS) -> dict[str, Any]:
    """{struct: {"size": n, "members": {name: [offset, bit or None, size]}}} from DWARF.

    pahole 1.24 given several classes walks the compile units once and gives
    up at the first class it has not met by then, so the ones it missed are
    asked for again one at a time (each search stops where its class is
    defined). A class the vmlinux does not have is left out.
    """
    wanted = list(dict.fromkeys(structs))
    layouts = parse_layouts(_run_classes(vmlinux, wanted))
    for name in [s for s in wanted if s not in layouts]:
        layouts.update(parse_layouts(_run_classes(vmlinux, [name])))
    return {name: layouts[name] for name in wanted if name in layouts}


def _run_classes(vmlinux: Path, classes: list[str]) -> str:
    argv = [_pahole(), "-F", "dwarf", "-C", ",".join(classes), str(vmlinux)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and not re.search(r"type '\w+' not found", proc.stderr):
        raise LabError(_failure(f"the layouts of {vmlinux.name}", proc))
    return proc.stdout


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(_failure(what, proc))
    return proc.stdout


def _failure(what: str, proc: subprocess.CompletedProcess[str]) -> str:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
    return f"pahole failed making {what} (exit code {proc.returncode}):\n{tail}"


def _name(decl: str) -> str | None:
    """The member name in a pahole declaration (function pointers and arrays included)."""
    decl = _ATTRIBUTE.sub("", decl).strip()
    fn = re.search(r"\(\*\s*(\w+)\)", decl)
    if fn:
        return fn[1]
    m = re.search(r"(\w+)\s*(?:\[[^\]]*\])*\s*(?::\s*\d+)?$", decl)
    return m[1] if m and not decl.rstrip().endswith(("struct", "union")) else None


def parse_layouts(text: str) -> dict[str, Any]:
    """Layouts from pahole's C output.

    Members of anonymous unions and structs are flattened into their parent
    (Volatility3's and vmishell's view); a named inline struct or union is a
    member itself and its members are also given as "outer.inner", with
    offsets from the start of the outermost struct, as pahole prints them.
    """
    layouts: dict[str, Any] = {}
    name: str | None = None
    stack: list[dict[str, list[int | None]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if name is None:
            m = re.match(r"^(struct|union) (\w+) \{$", line)
            if m:
                name, stack = m[2], [{}]
            continue
        if m := re.match(r"/\* size: (\d+)", stripped):
            layouts[name] = {"size": int(m[1]), "members": stack[0]}
            continue
        if line.startswith("}"):
            name = None
            continue
        if stripped.endswith("{") and stripped.startswith(("union", "struct")):
            stack.append({})
            continue
        if stripped.startswith("}") and len(stack) > 1:
            inner = stack.pop()
            closing = _MEMBER.match(line)
            outer = _name(stripped.lstrip("}").split("/*")[0].rstrip().rstrip(";"))
            if outer is None or closing is None:  # anonymous: its members are the parent's
                stack[-1].update(inner)
            else:
                stack[-1][outer] = [int(closing["off"]), None, int(closing["size"])]
                stack[-1].update({f"{outer}.{k}": v for k, v in inner.items()})
            continue
        m = _MEMBER.match(line)
        member = _name(m["decl"]) if m else None
        if m and member:
            bit = int(m["bit"]) if m["bit"] is not None else None
            stack[-1][member] = [int(m["off"]), bit, int(m["size"])]
    return layouts
