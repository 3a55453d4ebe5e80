"""The catalogue of lab guests: which Debian kernel, which QEMU, which paging mode.

Each guest exists to prove one address-translation mode on a real, unmodified
Debian kernel, so a spec names exactly what makes it different (CPU flags,
machine, kernel flavour) and nothing else. Several guests may share one built
image (the same kernel and initramfs): `image` names the build they use.

Other kernel generations are other Debian suites of the same architecture:
`x86_64-bullseye` (5.10), `x86_64-trixie` (6.12), `x86_64-sid` (newest), beside
the default `x86_64` (the host's suite, bookworm, 6.1). The suite is spelt as a
suffix like the other variants (`x86_64-la57`): a plain word that is safe in
file names, QEMU options and shell commands, and that says which archive
the kernel comes from rather than a version Debian will move on from. Only the
kernel comes from that suite: busybox and the workload stay the host suite's,
so every generation runs the same user space and prints the same ground truth.

The arm64 guests (`aarch64`, `aarch64-16k`) differ in machine (`virt`: RAM
starts at physical 0x40000000, console ttyAMA0), workload and register parser;
the runner reads the console name and the physical offset of RAM from the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmishell.errors import LabError

#: Guest RAM when the caller does not say otherwise.
DEFAULT_MEMORY_MB = 256

#: Accelerators `up` accepts. TCG is the default on purpose: /dev/kvm on these
#: machines is a nested software backend under which a stock Debian kernel is
#: still decompressing after minutes; ask for kvm explicitly on a real host.
ACCELERATORS = ("tcg", "kvm")


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to build and boot one kind of lab guest.

    `arch` is the guest CPU architecture as vmishell names it ("x86_64",
    "i386", "aarch64"): it selects the workload binary and register parser.
    `debian_arch` is the Debian architecture whose packages are downloaded.
    `phys_offset` is the guest-physical address of the first byte of the RAM
    file (0 on x86 `pc`/`q35` below 2 GiB, 0x40000000 on aarch64 `virt`).
    `suite` is the Debian suite the kernel package comes from ("" for the
    host's own apt sources).
    """

    name: str
    arch: str
    debian_arch: str
    kernel_package: str
    qemu_binary: str
    qemu_package: str
    machine: str
    paging: str
    description: str
    cpu: str | None = None
    console: str = "ttyS0"
    phys_offset: int = 0
    kaslr: bool = True
    image: str = ""
    kernel_args: tuple[str, ...] = field(default_factory=tuple)
    suite: str = ""

    @property
    def image_name(self) -> str:
        """The build this guest boots (guests with the same kernel share one)."""
        return self.image or self.name


GUESTS: dict[str, GuestSpec] = {
    spec.name: spec
    for spec in (
        GuestSpec(
            name="x86_64",
            arch="x86_64",
            debian_arch="amd64",
            kernel_package="linux-image-amd64",
            qemu_binary="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            machine="q35",
            cpu="qemu64",
            paging="4-level",
            description="Debian amd64 kernel, 4-level paging, KASLR on",
        ),
        GuestSpec(
            name="x86_64-la57",
            arch="x86_64",
            debian_arch="amd64",
            kernel_package="linux-image-amd64",
            qemu_binary="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            machine="q35",
            cpu="qemu64,+la57",
            paging="5-level",
            description="the x86_64 kernel on a CPU with LA57: 5-level paging",
            image="x86_64",
        ),
        GuestSpec(
            name="x86_64-pti",
            arch="x86_64",
            debian_arch="amd64",
            kernel_package="linux-image-amd64",
            qemu_binary="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            machine="q35",
            # An Intel model the kernel deems vulnerable to Meltdown (qemu64 is AMD):
            # it turns page-table isolation on, and user pages are NX in the kernel's copy.
            cpu="Skylake-Client-v4",
            paging="4-level",
            description="the x86_64 kernel on an Intel CPU model: page-table isolation (PTI) on",
            image="x86_64",
        ),
        GuestSpec(
            name="i386-pae",
            arch="i386",
            debian_arch="i386",
            kernel_package="linux-image-686-pae",
            qemu_binary="qemu-system-i386",
            qemu_package="qemu-system-x86",
            machine="pc",
            cpu="qemu32,+pae,+nx",
            paging="pae",
            description="Debian 686-pae kernel: 3-level PAE paging",
        ),
        GuestSpec(
            name="i386",
            arch="i386",
            debian_arch="i386",
            kernel_package="linux-image-686",
            qemu_binary="qemu-system-i386",
            qemu_package="qemu-system-x86",
            machine="pc",
            cpu="qemu32",
            paging="2-level",
            description="Debian 686 kernel: legacy 2-level paging",
        ),
    )
}


def _generation(suite: str, version: str) -> GuestSpec:
    """The default x86_64 guest with the kernel of another Debian suite."""
    return GuestSpec(
        name=f"x86_64-{suite}",
        arch="x86_64",
        debian_arch="amd64",
        kernel_package="linux-image-amd64",
        qemu_binary="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        machine="q35",
        cpu="qemu64",
        paging="4-level",
        description=f"Debian {suite} amd64 kernel ({version}), 4-level paging, KASLR on",
        suite=suite,
    )


#: Kernel generations other than the host suite's, oldest first.
GENERATIONS: tuple[str, ...] = ("bullseye", "trixie", "sid")
_VERSIONS = {"bullseye": "5.10", "trixie": "6.12", "sid": "newest"}
for _suite in GENERATIONS:
    _spec = _generation(_suite, _VERSIONS[_suite])
    GUESTS[_spec.name] = _spec
GUESTS["x86_64-sid-la57"] = GuestSpec(
    name="x86_64-sid-la57",
    arch="x86_64",
    debian_arch="amd64",
    kernel_package="linux-image-amd64",
    qemu_binary="qemu-system-x86_64",
    qemu_package="qemu-system-x86",
    machine="q35",
    cpu="qemu64,+la57",
    paging="5-level",
    description="the x86_64-sid kernel on a CPU with LA57: 5-level paging",
    image="x86_64-sid",
    suite="sid",
)


def _arm64(name: str, package: str, paging: str, description: str, suite: str = "") -> GuestSpec:
    """An arm64 guest on QEMU's `virt` machine: RAM from 0x40000000, console ttyAMA0.

    `-cpu max` offers every feature QEMU 7.2's TCG implements (LPA2 and LVA
    included), so a kernel built for 52-bit addresses runs with them: the
    trixie 16k kernel does (VMCOREINFO: VA_BITS=52, TCR_EL1_T1SZ=12), the
    bookworm 4k kernel is built for 48 bits (T1SZ=16).
    """
    return GuestSpec(
        name=name,
        arch="aarch64",
        debian_arch="arm64",
        kernel_package=package,
        qemu_binary="qemu-system-aarch64",
        qemu_package="qemu-system-arm",
        machine="virt",
        # pauth-impdef: QEMU's own pointer-authentication hash instead of QARMA5, which
        # TCG computes slowly; Debian's kernels sign every return address. Boots take a
        # third to a half of the CPU time (QEMU 7.2: 7.8 s instead of 23 s for aarch64).
        cpu="max,pauth-impdef=on",
        paging=paging,
        description=description,
        console="ttyAMA0",
        phys_offset=0x4000_0000,
        suite=suite,
    )


GUESTS["aarch64"] = _arm64(
    "aarch64",
    "linux-image-arm64",
    "4K-48bit",
    "Debian arm64 kernel (6.1) on the virt machine: 4 KiB pages, 48-bit VA",
)
GUESTS["aarch64-16k"] = _arm64(
    "aarch64-16k",
    "linux-image-arm64-16k",
    "16K-52bit",
    "Debian trixie arm64-16k kernel (6.12) on the virt machine: 16 KiB pages, 52-bit VA (LPA2)",
    suite="trixie",
)

#: Guests the design allows for but that are not implemented yet. Kept as data
#: so the catalogue's shape stays honest.
PLANNED_GUESTS: dict[str, GuestSpec] = {}


def get_guest(name: str | GuestSpec) -> GuestSpec:
    """The spec called `name`; a LabError lists the known names otherwise."""
    if isinstance(name, GuestSpec):
        return name
    try:
        return GUESTS[name]
    except KeyError:
        if name in PLANNED_GUESTS:
            raise LabError(f"guest {name!r} is planned but not implemented yet") from None
        known = ", ".join(GUESTS)
        raise LabError(f"unknown lab guest {name!r} (known: {known})") from None


def check_accel(accel: str) -> str:
    """Validate an accelerator name early, before anything is built or started."""
    if accel not in ACCELERATORS:
        raise LabError(f"unknown accelerator {accel!r} (use one of: {', '.join(ACCELERATORS)})")
    return accel
