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

Memory map (both segments page-aligned, p_align 0x1000):

    arch     code (R+X)   data (R+W)   data size
    x86_64   0x00400000   0x00600000   0x3000
    i386     0x08048000   0x0804a000   0x3000

The data segment's first page comes from the file: MARKER at +0x000, the
counter at +0x040, the timespec {1 s, 0 ns} at +0x050, THREAD_NAME at +0x060.
Its next two pages are zero (p_memsz > p_filesz) and hold the thread's stack,
whose top is the end of the segment. The marker and the counter share a page.
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

MARKER_OFFSET = 0x000
COUNTER_OFFSET = 0x040
TIMESPEC_OFFSET = 0x050
NAME_OFFSET = 0x060
DATA_FILE_SIZE = 0x080  # initialised part of the data segment
DATA_MEM_SIZE = 0x3000  # one data page + 8 KiB of thread stack
DATA_FILE_OFFSET = PAGE  # the data page sits at file offset 0x1000

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


_Piece = bytes | _Label | _Jump


def _assemble(pieces: Sequence[_Piece]) -> bytes:
    """Concatenate pieces, resolving rel8 jumps once every label's offset is known."""
    labels: dict[str, int] = {}
    pos = 0
    for piece in pieces:
        if isinstance(piece, _Label):
            labels[piece.name] = pos
        else:
            pos += 2 if isinstance(piece, _Jump) else len(piece)
    out = bytearray()
    for piece in pieces:
        if isinstance(piece, _Jump):
            rel = labels[piece.target] - (len(out) + 2)
            out += struct.pack("<Bb", piece.opcode, rel)  # struct rejects rel8 overflow
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


# --- ELF container -----------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """What differs per architecture; add an entry to _ARCHES to support another."""

    bits: int  # 32 or 64: ELF class, header sizes and the width of time_t/counter
    machine: int  # e_machine
    code_va: int
    data_va: int
    code: Callable[[WorkloadLayout], list[_Piece]]


_ARCHES: dict[str, _Arch] = {
    "x86_64": _Arch(64, 62, X86_64_CODE_VA, X86_64_DATA_VA, _code_x86_64),  # EM_X86_64
    "i386": _Arch(32, 3, I386_CODE_VA, I386_DATA_VA, _code_i386),  # EM_386
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
    assert code_end <= DATA_FILE_OFFSET, "workload code overflows its page"
    data_seg = (DATA_FILE_OFFSET, spec.data_va, DATA_FILE_SIZE, DATA_MEM_SIZE)
    segments = [  # (type, flags, offset, vaddr, filesz, memsz, align)
        (_PT_LOAD, _PF_R | _PF_X, 0, spec.code_va, code_end, code_end, PAGE),
        (_PT_LOAD, _PF_R | _PF_W, *data_seg, PAGE),
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
    image = bytearray(DATA_FILE_OFFSET + DATA_FILE_SIZE)
    image[: len(headers)] = headers
    image[code_start:code_end] = code
    image[DATA_FILE_OFFSET:] = _data_image(spec.bits // 8)
    return bytes(image)
