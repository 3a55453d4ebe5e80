"""Build vmishell profiles for Debian's current i386 kernels (686-pae and 686).

Debian's i386 kernels carry no BTF and no CONFIG_KALLSYMS_ALL, so the types
come from the `-dbg` package's DWARF (converted to BTF with pahole) and the
symbols from the `-dbg` package's System.map. For each meta package
(linux-image-686-pae, linux-image-686) this script:

 1. resolves the concrete kernel package it depends on today, with a private
    i386 apt state in the lab cache (the system's dpkg is left alone), and
    downloads the kernel .deb (kept: the lab boots it) and its -dbg .deb;
 2. streams vmlinux-<release> and System.map-<release> out of the -dbg .deb
    (`dpkg-deb --fsys-tarfile | tar x --occurrence=1`), then deletes the
    ~760 MB -dbg .deb unless --keep-debs;
 3. runs `pahole --btf_encode_detached=<release>.btf vmlinux-<release>`
    (about 5 s, 400 MB peak), then deletes the 315 MB vmlinux unless
    --keep-vmlinux;
 4. builds the ISF with vmishell.symbols.builder.build_profile and checks it
    (pointer size 4, banner, init_task address == System.map, swapper_pg_dir,
    page-table entry width: 8 bytes on PAE, 4 on legacy 686).

It is idempotent: a profile that exists and passes the checks is kept, and
each step is skipped when its output is already there.

Profiles go to ~/.cache/vmishell/built-profiles (searched by the profile
finder) unless --out-dir says otherwise (the project ships its own in
profiles/: `scripts/make-i386-profiles --out-dir profiles`).

Usage: python -m vmishell.lab.dbgprofiles [--flavour 686-pae|686 ...] [--out-dir DIR]
           [--work-dir DIR] [--refresh] [--keep-debs] [--keep-vmlinux] [--force]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vmishell.errors import LabError
from vmishell.lab.apt import PrivateApt
from vmishell.lab.paths import cache_root

FLAVOURS = ("686-pae", "686")
#: Bytes per page-table entry: PAE uses 64-bit entries, legacy 686 32-bit.
PTE_BYTES = {"686-pae": 8, "686": 4}


def say(msg: str) -> None:
    print(f"[make-i386-profiles] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def resolve(apt: PrivateApt, flavour: str, refresh: bool) -> tuple[str, str]:
    """(concrete kernel package, its version) that linux-image-<flavour> depends on."""
    meta = f"linux-image-{flavour}"
    apt.ensure_lists(refresh=refresh)
    names = [n for n in apt.depends(meta, prefix="linux-image-") if not n.endswith("-dbg")]
    if not names and not apt.updated:
        apt.update()
        names = [n for n in apt.depends(meta, prefix="linux-image-") if not n.endswith("-dbg")]
    if not names:
        sys.exit(f"cannot resolve {meta} (i386) to a kernel package")
    package = names[0]
    return package, apt.resolve(package)


def extract_dbg(dbg_deb: Path, release: str, work: Path) -> None:
    """Stream vmlinux-<release> and System.map-<release> out of the -dbg package."""
    members = [
        f"./usr/lib/debug/boot/vmlinux-{release}",
        f"./usr/lib/debug/boot/System.map-{release}",
    ]
    say(f"extracting {', '.join(Path(m).name for m in members)} from {dbg_deb.name}")
    t = time.monotonic()
    tmp = work / f".extract-{release}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    deb = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(dbg_deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    # --occurrence=1 stops reading once both members were seen (dpkg-deb then dies of SIGPIPE).
    tar = subprocess.run(
        ["tar", "x", "--occurrence=1", "--strip-components=5", "-C", str(tmp), *members],
        stdin=deb.stdout,
        check=False,
    )
    deb.stdout.close()  # type: ignore[union-attr]
    deb.wait()
    names = [Path(m).name for m in members]
    if tar.returncode != 0 or not all((tmp / n).is_file() for n in names):
        sys.exit(f"could not extract {members} from {dbg_deb}")
    for n in names:  # only complete files get their final names
        os.replace(tmp / n, work / n)
    tmp.rmdir()
    say(f"  done in {time.monotonic() - t:.1f} s")


def make_btf(vmlinux: Path, btf: Path) -> None:
    if shutil.which("pahole") is None:
        sys.exit("pahole is missing: apt-get install dwarves")
    say(f"pahole --btf_encode_detached={btf.name} {vmlinux.name}")
    t = time.monotonic()
    tmp = btf.with_name(btf.name + ".tmp")
    run(["pahole", f"--btf_encode_detached={tmp}", str(vmlinux)])
    os.replace(tmp, btf)
    say(f"  done in {time.monotonic() - t:.1f} s, {btf.stat().st_size} bytes")


def system_map_address(system_map: Path, name: str) -> int | None:
    pattern = re.compile(rf"^([0-9a-fA-F]+) \S {re.escape(name)}$")
    with system_map.open() as f:
        for line in f:
            m = pattern.match(line.rstrip("\n"))
            if m:
                return int(m.group(1), 16)
    return None


def check_profile(path: Path, flavour: str, release: str, system_map: Path) -> list[str]:
    """Problems with the profile at `path` (empty when it is good)."""
    from vmishell.symbols.profile import load_profile

    problems = []
    try:
        p = load_profile(path)
    except Exception as exc:
        return [f"does not load: {exc}"]
    if p.pointer_size != 4:
        problems.append(f"pointer_size {p.pointer_size}, not 4")
    banner = (p.banner or b"").decode("ascii", "replace")
    if not banner.startswith(f"Linux version {release} "):
        problems.append(f"banner {banner[:60]!r} is not for {release}")
    want = system_map_address(system_map, "init_task")
    if want is None or p.symbol_address("init_task") != want:
        problems.append("init_task address differs from System.map")
    if not p.has_symbol("swapper_pg_dir"):
        problems.append("no swapper_pg_dir symbol")
    # pteval_t is a typedef, which ISFs do not keep; struct pgprot wraps a
    # pgprotval_t, which has the width of a page-table entry.
    if p.size_of("pgprot") != PTE_BYTES[flavour]:
        problems.append(f"struct pgprot is {p.size_of('pgprot')} bytes, not {PTE_BYTES[flavour]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavour", action="append", choices=FLAVOURS, help="default: both")
    ap.add_argument("--out-dir", type=Path, help="default: ~/.cache/vmishell/built-profiles")
    ap.add_argument("--work-dir", type=Path, help="default: <lab cache>/dbg/i386")
    ap.add_argument("--refresh", action="store_true", help="update the package lists first")
    ap.add_argument("--keep-debs", action="store_true", help="keep the -dbg .deb (~760 MB)")
    ap.add_argument("--keep-vmlinux", action="store_true", help="keep the DWARF vmlinux (~315 MB)")
    ap.add_argument("--force", action="store_true", help="rebuild profiles that pass the checks")
    args = ap.parse_args(argv)

    from vmishell.symbols.builder import PROFILE_SUFFIX, build_profile, default_output_dir

    root = cache_root()
    out_dir = (args.out_dir or default_output_dir()).resolve()
    work = (args.work_dir or root / "dbg" / "i386").resolve()
    debs = root / "debs" / "i386"
    for d in (out_dir, work, debs, root / "locks"):
        d.mkdir(parents=True, exist_ok=True)

    apt = PrivateApt("i386", root / "apt" / "i386", say)
    failed = 0
    for flavour in args.flavour or FLAVOURS:
        with open(root / "locks" / "apt-i386.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            package, version = resolve(apt, flavour, args.refresh)
            try:
                kernel_deb = apt.download(package, version, debs)
            except LabError:
                if apt.updated:
                    raise
                apt.update()  # stale lists can name a version the mirror dropped
                package, version = resolve(apt, flavour, False)
                kernel_deb = apt.download(package, version, debs)
            release = package.removeprefix("linux-image-")
            say(f"linux-image-{flavour} -> {package} {version}")
            # builder.profile_filename's naming: release, then the Debian version.
            out = out_dir / f"linux-{release}-{version.replace(':', '_')}{PROFILE_SUFFIX}"
            system_map = work / f"System.map-{release}"
            btf = work / f"{release}.btf"
            vmlinux = work / f"vmlinux-{release}"
        if out.is_file() and system_map.is_file() and not args.force:
            problems = check_profile(out, flavour, release, system_map)
            if not problems:
                say(f"{out} is up to date")
                continue
            say(f"rebuilding {out.name}: {'; '.join(problems)}")

        if not system_map.is_file() or not (btf.is_file() or vmlinux.is_file()):
            with open(root / "locks" / "apt-i386.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    dbg_deb = apt.download(f"{package}-dbg", version, work)
                except LabError:
                    if apt.updated:
                        raise
                    apt.update()
                    dbg_deb = apt.download(f"{package}-dbg", version, work)
            extract_dbg(dbg_deb, release, work)
            if not args.keep_debs:
                dbg_deb.unlink()
        if not btf.is_file():
            make_btf(vmlinux, btf)
        if vmlinux.is_file() and not args.keep_vmlinux:
            vmlinux.unlink()

        say(f"building {out}")
        t = time.monotonic()
        build_profile(kernel_deb, out, system_map=system_map, btf=btf)
        out.chmod(0o644)  # write_isf's temporary file is created 0600
        say(f"  done in {time.monotonic() - t:.1f} s, {out.stat().st_size} bytes")
        problems = check_profile(out, flavour, release, system_map)
        if problems:
            failed += 1
            say(f"{out.name} FAILED its checks: {'; '.join(problems)}")
        else:
            say(f"{out.name}: checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
