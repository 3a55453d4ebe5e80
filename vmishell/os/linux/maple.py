"""Read a maple tree (lib/maple_tree.c, 6.1+) the way the kernel bounds it.

Each node covers an index range [min, max] given by its parent; slot i of a
node covers (pivot[i-1], pivot[i]], the last used slot up to the node's max.
Which slot is last comes from the pivots and the node's metadata
(`ma_data_end()`): slots after it are stale (left over from an earlier,
fuller state of the node) and are not part of the tree, so they are never
read as entries. Every entry is returned with the range the tree stores it
at, so the caller can check the object against it.

The tree is guest data: depth, node count and revisits are capped, a node
whose parent link does not point back is not followed, and pivots that go
backwards or leave their node's range mark the entries below them suspect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vmishell.errors import VmiError
from vmishell.limits import Limits
from vmishell.os.linux.layout import MapleLayout
from vmishell.os.linux.reader import KernelReader

# include/linux/maple_tree.h, lib/maple_tree.c
MAPLE_NODE_MASK = 0xFF
MAPLE_NODE_TYPE_SHIFT = 3
MAPLE_NODE_TYPE_MASK = 0x0F
#: ma_root holds a node (not a single entry at index 0) when bit 1 is set.
MAPLE_ROOT_NODE = 0x02
MAPLE_DENSE, MAPLE_LEAF_64, MAPLE_RANGE_64, MAPLE_ARANGE_64 = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class MapleEntry:
    """One entry and the index range [first, last] the tree stores it at.

    `problem` says why the range cannot be trusted (a bad pivot or end marker
    on the way down); the entry is still returned so the caller can show it.
    """

    value: int
    first: int
    last: int
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class _Visit:
    enode: int
    parent: int
    depth: int
    low: int
    high: int
    problem: str | None


def is_root_node(entry: int) -> bool:
    """xa_is_node() on ma_root: an encoded node pointer, not an entry of its own."""
    return entry & 3 == MAPLE_ROOT_NODE and entry > 4096


class MapleReader:
    """Walks maple trees through one kernel reader, with one set of caps."""

    def __init__(
        self, reader: KernelReader, layout: MapleLayout, limits: Limits, kernel_start: int
    ) -> None:
        self.r = reader
        self.m = layout
        self.limits = limits
        #: The lowest address a node can have (the kernel half).
        self.kernel_start = kernel_start
        self.max_index = (1 << (8 * reader.pointer_size)) - 1

    def entries(self, tree: int, problems: list[tuple[int, str]]) -> Iterator[MapleEntry]:
        """Every non-NULL entry of the tree at `tree`, in index order.

        Problems met on the way (a node that fails a check, and so is not
        followed) are appended to `problems` as (address, text).
        """
        m = self.m
        root = self.r.pointer(tree + m.tree_root)
        if root == 0:
            return
        if not is_root_node(root):
            # A tree holding one entry at index 0 keeps it in ma_root itself.
            yield MapleEntry(root, 0, 0)
            return
        where = f"maple tree at {tree:#x}"
        seen: set[int] = set()
        stack = [_Visit(root & ~MAPLE_ROOT_NODE, tree, 1, 0, self.max_index, None)]
        while stack:
            visit = stack.pop()
            node = visit.enode & ~MAPLE_NODE_MASK
            if node in seen:
                problems.append((node, f"{where}: node {node:#x} reached twice"))
                continue
            if visit.depth > self.limits.max_tree_depth:
                problems.append(
                    (node, f"{where}: deeper than {self.limits.max_tree_depth} levels at {node:#x}")
                )
                continue
            seen.add(node)
            if len(seen) > self.limits.max_tree_nodes:
                problems.append((node, f"{where}: over {self.limits.max_tree_nodes} nodes"))
                return
            try:
                slots = self._node(visit, where, problems)
            except VmiError as exc:
                problems.append((node, f"{where}: node {node:#x} is unreadable: {exc}"))
                continue
            if slots is None:
                continue
            kind = (visit.enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK
            if kind in (MAPLE_LEAF_64, MAPLE_DENSE):
                for value, low, high, problem in slots:
                    if value:
                        yield MapleEntry(value, low, high, problem)
                continue
            children = []
            for child, low, high, problem in slots:
                if not child:
                    continue
                if not self._is_child(child):
                    problems.append(
                        (node, f"{where}: internal node {node:#x} holds a non-node slot {child:#x}")
                    )
                    continue
                children.append(_Visit(child, node, visit.depth + 1, low, high, problem))
            stack.extend(reversed(children))

    def _node(
        self, visit: _Visit, where: str, problems: list[tuple[int, str]]
    ) -> list[tuple[int, int, int, str | None]] | None:
        """(slot value, first, last, problem) of the node's used slots; None if not followed."""
        m, r = self.m, self.r
        node = visit.enode & ~MAPLE_NODE_MASK
        raw_parent = r.pointer(node + m.node_parent)
        if (raw_parent & ~MAPLE_NODE_MASK) != (visit.parent & ~MAPLE_NODE_MASK):
            problems.append(
                (
                    node,
                    f"{where}: node {node:#x} names parent {raw_parent & ~MAPLE_NODE_MASK:#x}, "
                    f"expected {visit.parent & ~MAPLE_NODE_MASK:#x}",
                )
            )
            return None
        kind = (visit.enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK
        if kind == MAPLE_DENSE:
            slots = self._words(node + m.dense_slot, m.dense_slots)
            count = min(len(slots), visit.high - visit.low + 1)
            return [(slots[i], visit.low + i, visit.low + i, visit.problem) for i in range(count)]
        if kind == MAPLE_ARANGE_64:
            slots = self._words(node + m.arange_slot, m.arange_slots)
            pivots = self._words(node + m.arange_pivot, m.arange_pivots)
            end = r.u8(node + m.arange_meta)
        elif kind in (MAPLE_RANGE_64, MAPLE_LEAF_64):
            slots = self._words(node + m.range_slot, m.range_slots)
            pivots = self._words(node + m.range_pivot, m.range_pivots)
            end = self._range_end(node, pivots, visit.high)
        else:
            problems.append((node, f"{where}: node {node:#x} has type {kind}"))
            return None
        problem = visit.problem
        if end >= len(slots):
            problem = (
                problem or f"{where}: node {node:#x} says it ends at slot {end} of {len(slots)}"
            )
            end = len(slots) - 1
        out = []
        low = visit.low
        for i in range(end + 1):
            # mas_logical_pivot(): past the pivots, or an unset one, runs to the node's max.
            high = pivots[i] if i < len(pivots) else visit.high
            if high == 0 and i > 0:
                high = visit.high
            in_order = low <= high <= visit.high
            if problem is None and not in_order:
                problem = (
                    f"{where}: node {node:#x} slot {i} ends at {high:#x}, outside "
                    f"{low:#x}..{visit.high:#x} (pivots out of order or out of range)"
                )
            out.append((slots[i], low, high, problem))
            if in_order:
                low = high + 1
        return out

    def _range_end(self, node: int, pivots: list[int], high: int) -> int:
        """ma_data_end() of a range_64 or leaf_64 node."""
        last = len(pivots) - 1
        if pivots[last] == 0:
            return self.r.u8(node + self.m.range_meta)
        if pivots[last] == high:
            return last
        return len(pivots)

    def _is_child(self, enode: int) -> bool:
        """mt_mk_node() values: a 256-byte aligned kernel node, a known type, bits 0-1 clear."""
        kind = (enode >> MAPLE_NODE_TYPE_SHIFT) & MAPLE_NODE_TYPE_MASK
        return (
            enode & 3 == 0
            and enode & 0x80 == 0
            and kind <= MAPLE_ARANGE_64
            and self._kernel_pointer(enode & ~MAPLE_NODE_MASK)
        )

    def _kernel_pointer(self, value: int) -> bool:
        return value >= self.kernel_start

    def _words(self, address: int, count: int) -> list[int]:
        size = self.r.pointer_size
        raw = self.r.read(address, size * count)
        return [int.from_bytes(raw[i : i + size], "little") for i in range(0, len(raw), size)]
