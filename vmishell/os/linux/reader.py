"""Typed reads of guest kernel memory: integers, pointers, C strings, list walks.

Everything read here is untrusted. Readers raise vmishell errors only, and the
one list walker checks every prev link and keeps a seen-set and a cap, so a
cyclic or endless guest list ends in a clear GuestDataError instead of a hang.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from vmishell.arch import AddressSpace
from vmishell.errors import GuestDataError, VmiError


class KernelReader:
    """Reads typed values from one virtual address space of the guest."""

    def __init__(self, space: AddressSpace, pointer_size: int) -> None:
        self.space = space
        self.pointer_size = pointer_size
        self._ptr = struct.Struct("<Q" if pointer_size == 8 else "<I")
        self._pair = struct.Struct("<QQ" if pointer_size == 8 else "<II")

    def read(self, vaddr: int, size: int) -> bytes:
        return self.space.read(vaddr, size)

    def u8(self, vaddr: int) -> int:
        return self.space.read(vaddr, 1)[0]

    def u16(self, vaddr: int) -> int:
        return int.from_bytes(self.space.read(vaddr, 2), "little")

    def u32(self, vaddr: int) -> int:
        return int.from_bytes(self.space.read(vaddr, 4), "little")

    def u64(self, vaddr: int) -> int:
        return int.from_bytes(self.space.read(vaddr, 8), "little")

    def s32(self, vaddr: int) -> int:
        return int.from_bytes(self.space.read(vaddr, 4), "little", signed=True)

    def pointer(self, vaddr: int) -> int:
        return self._ptr.unpack(self.space.read(vaddr, self.pointer_size))[0]

    def pointer_pair(self, vaddr: int) -> tuple[int, int]:
        """Two pointers side by side (a list_head, a start/end pair) in one read."""
        return self._pair.unpack(self.space.read(vaddr, 2 * self.pointer_size))

    def cstring(self, vaddr: int, limit: int) -> bytes:
        """Bytes up to the first NUL, at most `limit`, reading page by page."""
        out = bytearray()
        pos = vaddr
        while len(out) < limit:
            chunk = min(limit - len(out), 4096 - (pos & 0xFFF))
            data = self.space.read(pos, chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                out += data[:nul]
                return bytes(out)
            out += data
            pos += chunk
        return bytes(out)

    def walk_links(self, head: int, cap: int, what: str) -> Iterator[tuple[int, str | None]]:
        """Yield (list_head address, problem) for each node after `head`.

        Every node's `prev` must name the node it was reached from, as the
        kernel's own CONFIG_DEBUG_LIST checks: a `next` pointer redirected
        past a task (to hide it) or into unrelated memory shows up as a
        problem on the node it leads to, which is still yielded so the
        caller can list it as suspect. A cycle that misses
        the head, a NULL or unreadable link and more than `cap` nodes end the
        walk with GuestDataError; the seen-set makes the walk's memory and
        time linear in the nodes actually present.
        """
        seen = {head}
        try:
            node = self.pointer(head)
        except VmiError as exc:
            raise GuestDataError(f"{what}: cannot read list head at {head:#x}: {exc}") from exc
        count = 0
        before = head
        astray = False  # the previous node's prev did not point back either
        while node != head:
            if node in seen:
                raise GuestDataError(
                    f"{what}: list loops back to {node:#x} without reaching its head {head:#x}"
                )
            if node == 0:
                raise GuestDataError(f"{what}: NULL link after {count} entries (list at {head:#x})")
            count += 1
            if count > cap:
                raise GuestDataError(f"{what}: more than {cap} entries (list at {head:#x})")
            seen.add(node)
            problem = None
            following: int | None = None
            try:  # next and prev in one read (a list_head is the two, side by side)
                following, prev = self.pointer_pair(node)
            except VmiError:
                try:
                    prev = self.pointer(node + self.pointer_size)
                except VmiError as exc:
                    problem = f"{what}: cannot read the prev link at {node:#x}: {exc}"
            if problem is None and prev != before:
                problem = (
                    f"{what}: reached from {before:#x} but its prev link names "
                    f"{prev:#x} (list tampered with, or changing: pause a live guest)"
                )
            if problem and astray:
                # Two links in a row that do not point back: this is no longer the
                # list but whatever memory the bad link led to. Stop, do not list it.
                raise GuestDataError(
                    f"{what}: links stop pointing back after {before:#x} "
                    f"(entry {count}): the list leads into foreign memory"
                )
            astray = problem is not None
            yield node, problem
            before = node
            if following is None:
                try:
                    following = self.pointer(node)
                except VmiError as exc:
                    raise GuestDataError(
                        f"{what}: cannot follow link at {node:#x} (entry {count}): {exc}"
                    ) from exc
            node = following


def decode_guest_string(raw: bytes) -> str:
    """Guest bytes as text: invalid UTF-8 kept visible as escapes, never dropped."""
    return raw.decode("utf-8", "backslashreplace")
