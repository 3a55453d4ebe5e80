"""A tiny static Linux workload whose memory layout is known before it runs.

The lab guests have only busybox and no cross-compiler, yet vmishell's tests
need a multi-threaded process with a marker and a ticking counter at fixed
virtual addresses. So we emit the ELF executable ourselves: hand-encoded
machine code (syscalls only, no libc) and headers packed with `struct`.

The program, identical on every architecture:

1. stores 0 into the counter, so the data page is private and present;
2. clones ONE thread (CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM) whose stack
   lives in the data segment; the thread names itself THREAD_NAME with
   prctl(PR_SET_NAME) and then sleeps forever;
3. loops forever in the main thread: counter += 1, nanosleep(1 s).

The main thread's comm is left alone: it is the basename it is executed as.

Memory map (both segments aligned to p_align, the largest page size of the arch):

    arch     code (R+X)   data (R+W)   data size   p_align (data at file offset)
    x86_64   0x00400000   0x00600000   0x3000      0x1000
    i386     0x08048000   0x0804a000   0x3000      0x1000
    aarch64  0x00400000   0x00600000   0x3000      0x10000 (4, 16 and 64 KiB pages)

The data segment's first 4 KiB come from the file: MARKER at +0x000, the
counter at +0x040, the timespec {1 s, 0 ns} at +0x050, THREAD_NAME at +0x060.
The rest is zero (p_memsz > p_filesz) and holds the thread's stack, whose top
is the end of the segment. The marker and the counter share a page (with 16
or 64 KiB pages the whole segment is one page).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MARKER = b"VMISHELL-MARKER-5e1f0c2a9b7d"
THREAD_NAME = "vmi-thread"

PAGE = 0x1000
X86_64_CODE_VA = 0x0040_0000
X86_64_DATA_VA = 0x0060_0000
I386_CODE_VA = 0x0804_8000
I386_DATA_VA = 0x0804_A000
AARCH64_CODE_VA = 0x0040_0000
AARCH64_DATA_VA = 0x0060_0000

MARKER_OFFSET = 0x000
COUNTER_OFFSET = 0x040
TIMESPEC_OFFSET = 0x050
NAME_OFFSET = 0x060
DATA_FILE_SIZE = 0x080  # initialised part of the data segment
DATA_MEM_SIZE = 0x3000  # 4 KiB of data + 8 KiB of thread stack
ARM64_ALIGN = 0x10000  # p_align on aarch64: a multiple of every granule (4, 16, 64 KiB)

# CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
_CLONE_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000
_PR_SET_NAME = 15
_PT_LOAD, _PT_GNU_STACK = 1, 0x6474E551
_PF_X, _PF_W, _PF_R = 1, 2, 4

assert len(MARKER) < COUNTER_OFFSET - MARKER_OFFSET
assert len(THREAD_NAME) <= 15  # TASK_COMM_LEN - 1
assert NAME_OFFSET + len(THREAD_NAME) < DATA_FILE_SIZE


@dataclass(frozen=True)
class WorkloadLayout:
    """Where the workload's known bytes live in its address space."""

    arch: str
    marker_va: int
    counter_va: int
    counter_size: int  # 8 on x86_64, 4 on i386: also the size of time_t
    entry: int
    code_va: int
    data_va: int


# --- a two-pass assembler for short jumps ------------------------------------


@dataclass(frozen=True)
class _Label:
    name: str


@dataclass(frozen=True)
class _Jump:
    """A two-byte short jump (opcode, rel8) to a label."""

    opcode: int
    target: str

    size = 2

    def encode(self, rel: int) -> bytes:
        return struct.pack("<Bb", self.opcode, rel)  # struct rejects rel8 overflow


@dataclass(frozen=True)
class _Branch:
    """An AArch64 PC-relative branch to a label: `base` with the word offset placed.

    `bits` wide at bit `shift` (B: 26 at 0; CBZ: 19 at 5; TBNZ: 14 at 5); the
    offset is counted from the branch itself, in 4-byte instructions.
    """

    base: int
    target: str
    bits: int
    shift: int

    size = 4

    def encode(self, rel: int) -> bytes:
        rel += self.size  # AArch64 branches are relative to their own address
        words = rel // 4
        if rel % 4 or not -(1 << (self.bits - 1)) <= words < 1 << (self.bits - 1):
            raise ValueError(f"branch to {self.target} out of range ({rel} bytes)")
        mask = (1 << self.bits) - 1
        return _u32(self.base | (words & mask) << self.shift)


_Piece = bytes | _Label | _Jump | _Branch


def _assemble(pieces: Sequence[_Piece]) -> bytes:
    """Concatenate pieces, resolving relative jumps once every label's offset is known."""
    labels: dict[str, int] = {}
    pos = 0
    for piece in pieces:
        if isinstance(piece, _Label):
            labels[piece.name] = pos
        else:
            pos += piece.size if isinstance(piece, _Jump | _Branch) else len(piece)
    out = bytearray()
    for piece in pieces:
        if isinstance(piece, _Jump | _Branch):
            out += piece.encode(labels[piece.target] - (len(out) + piece.size))
        elif isinstance(piece, bytes):
            out += piece
    return bytes(out)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


# Register numbers shared by x86_64 and i386 encodings.
_EAX, _ECX, _EDX, _EBX, _ESI, _EDI = 0, 1, 2, 3, 6, 7
_JZ, _JS, _JMP = 0x74, 0x78, 0xEB


def _mov_imm(reg: int, value: int) -> bytes:
    """mov r32, imm32 (on x86_64 this zero-extends into the 64-bit register)."""
    return bytes([0xB8 + reg]) + _u32(value)


def _xor_self(reg: int) -> bytes:
    """xor r32, r32."""
    return bytes([0x31, 0xC0 | reg << 3 | reg])


# --- per-architecture code ---------------------------------------------------


def _code_x86_64(lay: WorkloadLayout) -> list[_Piece]:
    counter, timespec = _u32(lay.counter_va), lay.data_va + TIMESPEC_OFFSET
    syscall = b"\x0f\x05"
    sleep = [_mov_imm(_EAX, 35), _mov_imm(_EDI, timespec), _xor_self(_ESI), syscall]
    return [
        b"\x48\xc7\x04\x25" + counter + _u32(0),  # mov qword [counter], 0
        _mov_imm(_EAX, 56),  # mov eax, SYS_clone
        _mov_imm(_EDI, _CLONE_FLAGS),  # mov edi, flags
        _mov_imm(_ESI, lay.data_va + DATA_MEM_SIZE),  # mov esi, stack_top
        _xor_self(_EDX),  # xor edx, edx          ; parent_tid = NULL
        b"\x45\x31\xd2",  # xor r10d, r10d        ; child_tid = NULL
        b"\x45\x31\xc0",  # xor r8d, r8d          ; tls = 0
        syscall,  # syscall
        b"\x48\x85\xc0",  # test rax, rax
        _Jump(_JZ, "thread"),  # jz thread
        _Jump(_JS, "fail"),  # js fail
        _Label("main"),
        b"\x48\xff\x04\x25" + counter,  # inc qword [counter]
        *sleep,  # mov eax, SYS_nanosleep; mov edi, timespec; xor esi, esi; syscall
        _Jump(_JMP, "main"),  # jmp main
        _Label("thread"),
        _mov_imm(_EAX, 157),  # mov eax, SYS_prctl
        _mov_imm(_EDI, _PR_SET_NAME),  # mov edi, PR_SET_NAME
        _mov_imm(_ESI, lay.data_va + NAME_OFFSET),  # mov esi, name
        syscall,  # syscall
        _Label("sleep"),
        *sleep,  # nanosleep(timespec, NULL)
        _Jump(_JMP, "sleep"),  # jmp sleep
        _Label("fail"),
        _mov_imm(_EDI, 1),  # mov edi, 1
        _mov_imm(_EAX, 60),  # mov eax, SYS_exit
        syscall,  # syscall
    ]


def _code_i386(lay: WorkloadLayout) -> list[_Piece]:
    counter, timespec = _u32(lay.counter_va), lay.data_va + TIMESPEC_OFFSET
    int80 = b"\xcd\x80"
    sleep = [_mov_imm(_EAX, 162), _mov_imm(_EBX, timespec), _xor_self(_ECX), int80]
    return [
        b"\xc7\x05" + counter + _u32(0),  # mov dword [counter], 0
        _mov_imm(_EAX, 120),  # mov eax, SYS_clone
        _mov_imm(_EBX, _CLONE_FLAGS),  # mov ebx, flags
        _mov_imm(_ECX, lay.data_va + DATA_MEM_SIZE),  # mov ecx, stack_top
        _xor_self(_EDX),  # xor edx, edx          ; parent_tid = NULL
        _xor_self(_ESI),  # xor esi, esi          ; tls = 0
        _xor_self(_EDI),  # xor edi, edi          ; child_tid = NULL
        int80,  # int 0x80
        b"\x85\xc0",  # test eax, eax
        _Jump(_JZ, "thread"),  # jz thread
        _Jump(_JS, "fail"),  # js fail
        _Label("main"),
        b"\xff\x05" + counter,  # inc dword [counter]
        *sleep,  # mov eax, SYS_nanosleep; mov ebx, timespec; xor ecx, ecx; int 0x80
        _Jump(_JMP, "main"),  # jmp main
        _Label("thread"),
        _mov_imm(_EAX, 172),  # mov eax, SYS_prctl
        _mov_imm(_EBX, _PR_SET_NAME),  # mov ebx, PR_SET_NAME
        _mov_imm(_ECX, lay.data_va + NAME_OFFSET),  # mov ecx, name
        int80,  # int 0x80
        _Label("sleep"),
        *sleep,  # nanosleep(timespec, NULL)
        _Jump(_JMP, "sleep"),  # jmp sleep
        _Label("fail"),
        _mov_imm(_EBX, 1),  # mov ebx, 1
        _mov_imm(_EAX, 1),  # mov eax, SYS_exit
        int80,  # int 0x80
    ]


def _a64_load(reg: int, value: int) -> bytes:
    """movz xN, #lo16; movk xN, #hi16, lsl #16: a 32-bit constant into a 64-bit register."""
    assert 0 <= value < 1 << 32
    movz = 0xD2800000 | (value & 0xFFFF) << 5 | reg
    movk = 0xF2A00000 | (value >> 16) << 5 | reg  # hw=1: bits 16-31
    return _u32(movz) + (_u32(movk) if value >> 16 else b"")


def _a64_sleep(timespec: int) -> list[_Piece]:
    """nanosleep(timespec, NULL)."""
    return [_a64_load(_X8, 101), _a64_load(_X0, timespec), _a64_load(_X1, 0), _SVC]


_X0, _X1, _X2, _X3, _X4, _X8, _X9, _X10 = 0, 1, 2, 3, 4, 8, 9, 10
_SVC = _u32(0xD4000001)  # svc #0: syscall number in x8, arguments in x0-x5


def _code_aarch64(lay: WorkloadLayout) -> list[_Piece]:
    """The same program for arm64 (generic syscall numbers; clone's arm64 argument order)."""
    timespec = lay.data_va + TIMESPEC_OFFSET
    return [
        _a64_load(_X9, lay.counter_va),  # x9 = &counter (kept by the thread too)
        _u32(0xF900013F),  # str xzr, [x9]
        _a64_load(_X8, 220),  # x8 = SYS_clone
        _a64_load(_X0, _CLONE_FLAGS),  # x0 = flags
        _a64_load(_X1, lay.data_va + DATA_MEM_SIZE),  # x1 = stack_top
        _a64_load(_X2, 0),  # x2 = parent_tid = NULL
        _a64_load(_X3, 0),  # x3 = tls = 0
        _a64_load(_X4, 0),  # x4 = child_tid = NULL
        _SVC,  # svc #0
        _Branch(0xB4000000 | _X0, "thread", 19, 5),  # cbz x0, thread
        _Branch(0xB7F80000 | _X0, "fail", 14, 5),  # tbnz x0, #63, fail
        _Label("main"),
        _u32(0xF940012A),  # ldr x10, [x9]
        _u32(0x9100054A),  # add x10, x10, #1
        _u32(0xF900012A),  # str x10, [x9]
        *_a64_sleep(timespec),  # nanosleep(timespec, NULL)
        _Branch(0x14000000, "main", 26, 0),  # b main
        _Label("thread"),
        _a64_load(_X8, 167),  # x8 = SYS_prctl
        _a64_load(_X0, _PR_SET_NAME),  # x0 = PR_SET_NAME
        _a64_load(_X1, lay.data_va + NAME_OFFSET),  # x1 = name
        _SVC,  # svc #0
        _Label("sleep"),
        *_a64_sleep(timespec),  # nanosleep(timespec, NULL)
        _Branch(0x14000000, "sleep", 26, 0),  # b sleep
        _Label("fail"),
        _a64_load(_X0, 1),  # x0 = 1
        _a64_load(_X8, 93),  # x8 = SYS_exit
        _SVC,  # svc #0
    ]


# --- ELF container -----------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """What differs per architecture; add an entry to _ARCHES to support another."""

    bits: int  # 32 or 64: ELF class, header sizes and the width of time_t/counter
    machine: int  # e_machine
    code_va: int
    data_va: int
    code: Callable[[WorkloadLayout], list[_Piece]]
    #: p_align, and the file offset of the data segment: the kernel maps a segment
    #: only when its file offset and address agree modulo its own page size.
    align: int = PAGE


_ARCHES: dict[str, _Arch] = {
    "x86_64": _Arch(64, 62, X86_64_CODE_VA, X86_64_DATA_VA, _code_x86_64),  # EM_X86_64
    "i386": _Arch(32, 3, I386_CODE_VA, I386_DATA_VA, _code_i386),  # EM_386
    "aarch64": _Arch(  # EM_AARCH64
        64, 183, AARCH64_CODE_VA, AARCH64_DATA_VA, _code_aarch64, ARM64_ALIGN
    ),
}

_PHNUM = 3  # code PT_LOAD, data PT_LOAD, PT_GNU_STACK (non-executable stack)


def _arch(arch: str) -> _Arch:
    try:
        return _ARCHES[arch]
    except KeyError:
        known = ", ".join(sorted(_ARCHES))
        raise ValueError(f"no workload for arch {arch!r} (known: {known})") from None


def _sizes(spec: _Arch) -> tuple[int, int, int]:
    """(e_ehsize, e_phentsize, e_shentsize) for the arch's ELF class."""
    return (64, 56, 64) if spec.bits == 64 else (52, 32, 40)


def _headers_size(spec: _Arch) -> int:
    ehsize, phentsize, _ = _sizes(spec)
    return ehsize + _PHNUM * phentsize


def layout(arch: str) -> WorkloadLayout:
    """The fixed addresses of the workload built by `build_workload(arch)`."""
    spec = _arch(arch)
    code_start = -(-_headers_size(spec) // 16) * 16  # code follows the headers, 16-aligned
    return WorkloadLayout(
        arch=arch,
        marker_va=spec.data_va + MARKER_OFFSET,
        counter_va=spec.data_va + COUNTER_OFFSET,
        counter_size=spec.bits // 8,
        entry=spec.code_va + code_start,
        code_va=spec.code_va,
        data_va=spec.data_va,
    )


def _data_image(word: int) -> bytes:
    """The file-backed start of the data segment: marker, counter, timespec, name."""
    image = bytearray(DATA_FILE_SIZE)
    image[MARKER_OFFSET : MARKER_OFFSET + len(MARKER)] = MARKER
    fmt = "<qq" if word == 8 else "<ii"  # struct timespec {time_t tv_sec; long tv_nsec;}
    image[TIMESPEC_OFFSET : TIMESPEC_OFFSET + 2 * word] = struct.pack(fmt, 1, 0)
    name = THREAD_NAME.encode("ascii") + b"\0"
    image[NAME_OFFSET : NAME_OFFSET + len(name)] = name
    return bytes(image)


def build_workload(arch: str) -> bytes:
    """The complete static ELF executable for `arch` (see the module docstring)."""
    spec, lay = _arch(arch), layout(arch)
    code = _assemble(spec.code(lay))
    code_start = lay.entry - spec.code_va
    code_end = code_start + len(code)
    data_offset = spec.align  # the data page's file offset, congruent to data_va
    assert code_end <= data_offset, "workload code overflows its page"
    data_seg = (data_offset, spec.data_va, DATA_FILE_SIZE, DATA_MEM_SIZE)
    segments = [  # (type, flags, offset, vaddr, filesz, memsz, align)
        (_PT_LOAD, _PF_R | _PF_X, 0, spec.code_va, code_end, code_end, spec.align),
        (_PT_LOAD, _PF_R | _PF_W, *data_seg, spec.align),
        (_PT_GNU_STACK, _PF_R | _PF_W, 0, 0, 0, 0, 16),  # keeps the stack non-executable
    ]
    wide = spec.bits == 64
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1, 1]) + bytes(9)  # class, LE, v1, SysV ABI
    ehsize, phentsize, shentsize = _sizes(spec)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH" if wide else "<16sHHIIIIIHHHHHH",
        ident,
        2,  # e_type = ET_EXEC
        spec.machine,
        1,  # e_version
        lay.entry,
        ehsize,  # e_phoff: program headers follow the ELF header
        0,  # e_shoff: no section headers
        0,  # e_flags
        ehsize,
        phentsize,
        _PHNUM,
        shentsize,
        0,  # e_shnum
        0,  # e_shstrndx
    )
    phdrs = b"".join(
        struct.pack("<IIQQQQQQ", t, f, off, va, va, fsz, msz, al)
        if wide  # Elf64_Phdr puts p_flags second, Elf32_Phdr puts it seventh
        else struct.pack("<IIIIIIII", t, off, va, va, fsz, msz, f, al)
        for t, f, off, va, fsz, msz, al in segments
    )
    headers = ehdr + phdrs
    assert len(headers) == _headers_size(spec)
    image = bytearray(data_offset + DATA_FILE_SIZE)
    image[: len(headers)] = headers
    image[code_start:code_end] = code
    image[data_offset:] = _data_image(spec.bits // 8)
    return bytes(image)
