"""The offsets the Linux layer uses, looked up once per profile.

Looking fields up by name on every task would re-walk the profile on the hot
path; this table is built once at attach and then only indexed. The tables
are named tuples, not dataclasses: ~80 fields of frozen dataclasses cost
every attach several milliseconds of generated code at import.
"""

from __future__ import annotations

from typing import NamedTuple

from vmishell.errors import SymbolNotFound
from vmishell.symbols.profile import Profile


def _first_field(profile: Profile, struct: str, *names: str) -> int | None:
    for name in names:
        if profile.has_field(struct, name):
            return profile.offset_of(struct, name)
    return None


class TaskLayout(NamedTuple):
    size: int
    tasks: int
    pid: int
    tgid: int
    comm: int
    comm_size: int
    mm: int
    active_mm: int
    real_parent: int
    flags: int
    state: int | None
    exit_state: int | None
    real_cred: int | None
    cred: int | None
    start_time: int | None
    start_boottime: int | None
    thread_group: int | None
    thread_node: int | None
    signal: int | None
    signal_thread_head: int | None
    cred_uid: int
    cred_gid: int
    cred_euid: int | None
    worker_private: int | None
    kthread_full_name: int | None
    #: wq_worker_comm() shows a worker's full ID (the kernel has format_worker_id).
    worker_full_id: bool = False


class MmLayout(NamedTuple):
    size: int
    pgd: int
    mm_mt: int | None
    mmap: int | None
    map_count: int | None
    arg_start: int
    arg_end: int
    start_brk: int
    brk: int
    start_stack: int


class VmaLayout(NamedTuple):
    size: int
    vm_start: int
    vm_end: int
    vm_next: int | None
    vm_prev: int | None
    vm_mm: int
    vm_flags: int
    vm_pgoff: int
    vm_file: int
    vm_ops: int | None
    vm_private_data: int | None
    file_path: int
    path_dentry: int
    path_mnt: int
    dentry_name: int
    dentry_parent: int
    qstr_name: int
    qstr_len: int
    dentry_inode: int | None
    inode_ino: int | None
    inode_sb: int | None
    sb_dev: int | None
    mount_mnt: int | None
    mount_parent: int | None
    mount_mountpoint: int | None
    vfsmount_root: int | None


class MapleLayout(NamedTuple):
    """Offsets inside `struct maple_node`, for each node type that holds ranges.

    `*_meta` is the offset of `maple_metadata.end`, the last used slot of a
    node that is not full (in range_64 nodes it shares the last slot).
    """

    tree_root: int
    tree_flags: int
    node_size: int
    node_parent: int
    range_slot: int
    range_slots: int
    arange_slot: int
    arange_slots: int
    dense_slot: int
    dense_slots: int
    range_pivot: int
    range_pivots: int
    arange_pivot: int
    arange_pivots: int
    range_meta: int
    arange_meta: int


def _array(profile: Profile, struct: str, field: str) -> tuple[int, int]:
    f = profile.field(struct, field)
    count = f.type.count or 0
    return f.offset, count


def task_layout(p: Profile) -> TaskLayout:
    uid = p.offset_of("cred", "uid")
    comm = p.field("task_struct", "comm")
    return TaskLayout(
        size=p.size_of("task_struct"),
        tasks=p.offset_of("task_struct", "tasks"),
        pid=p.offset_of("task_struct", "pid"),
        tgid=p.offset_of("task_struct", "tgid"),
        comm=comm.offset,
        comm_size=comm.type.count or 16,
        mm=p.offset_of("task_struct", "mm"),
        active_mm=p.offset_of("task_struct", "active_mm"),
        real_parent=p.offset_of("task_struct", "real_parent"),
        flags=p.offset_of("task_struct", "flags"),
        state=_first_field(p, "task_struct", "__state", "state"),
        exit_state=_first_field(p, "task_struct", "exit_state"),
        real_cred=_first_field(p, "task_struct", "real_cred"),
        cred=_first_field(p, "task_struct", "cred"),
        start_time=_first_field(p, "task_struct", "start_time"),
        start_boottime=_first_field(p, "task_struct", "start_boottime", "real_start_time"),
        thread_group=_first_field(p, "task_struct", "thread_group"),
        thread_node=_first_field(p, "task_struct", "thread_node"),
        signal=_first_field(p, "task_struct", "signal"),
        signal_thread_head=_first_field(p, "signal_struct", "thread_head")
        if p.has_type("signal_struct")
        else None,
        cred_uid=uid,
        cred_gid=p.offset_of("cred", "gid"),
        cred_euid=_first_field(p, "cred", "euid"),
        worker_private=_first_field(p, "task_struct", "worker_private"),
        kthread_full_name=(
            _first_field(p, "kthread", "full_name") if p.has_type("kthread") else None
        ),
        worker_full_id=p.has_symbol("format_worker_id"),
    )


def mm_layout(p: Profile) -> MmLayout:
    return MmLayout(
        size=p.size_of("mm_struct"),
        pgd=p.offset_of("mm_struct", "pgd"),
        mm_mt=_first_field(p, "mm_struct", "mm_mt"),
        mmap=_first_field(p, "mm_struct", "mmap"),
        map_count=_first_field(p, "mm_struct", "map_count"),
        arg_start=p.offset_of("mm_struct", "arg_start"),
        arg_end=p.offset_of("mm_struct", "arg_end"),
        start_brk=p.offset_of("mm_struct", "start_brk"),
        brk=p.offset_of("mm_struct", "brk"),
        start_stack=p.offset_of("mm_struct", "start_stack"),
    )


def vma_layout(p: Profile) -> VmaLayout:
    has_mount = p.has_type("mount")
    return VmaLayout(
        size=p.size_of("vm_area_struct"),
        vm_start=p.offset_of("vm_area_struct", "vm_start"),
        vm_end=p.offset_of("vm_area_struct", "vm_end"),
        vm_next=_first_field(p, "vm_area_struct", "vm_next"),
        vm_prev=_first_field(p, "vm_area_struct", "vm_prev"),
        vm_mm=p.offset_of("vm_area_struct", "vm_mm"),
        vm_flags=p.offset_of("vm_area_struct", "vm_flags"),
        vm_pgoff=p.offset_of("vm_area_struct", "vm_pgoff"),
        vm_file=p.offset_of("vm_area_struct", "vm_file"),
        vm_ops=_first_field(p, "vm_area_struct", "vm_ops"),
        vm_private_data=_first_field(p, "vm_area_struct", "vm_private_data"),
        file_path=p.offset_of("file", "f_path"),
        path_dentry=p.offset_of("path", "dentry"),
        path_mnt=p.offset_of("path", "mnt"),
        dentry_name=p.offset_of("dentry", "d_name"),
        dentry_parent=p.offset_of("dentry", "d_parent"),
        qstr_name=p.offset_of("qstr", "name"),
        qstr_len=p.offset_of("qstr", "len"),
        dentry_inode=_first_field(p, "dentry", "d_inode"),
        inode_ino=_first_field(p, "inode", "i_ino") if p.has_type("inode") else None,
        inode_sb=_first_field(p, "inode", "i_sb") if p.has_type("inode") else None,
        sb_dev=_first_field(p, "super_block", "s_dev") if p.has_type("super_block") else None,
        mount_mnt=_first_field(p, "mount", "mnt") if has_mount else None,
        mount_parent=_first_field(p, "mount", "mnt_parent") if has_mount else None,
        mount_mountpoint=_first_field(p, "mount", "mnt_mountpoint") if has_mount else None,
        vfsmount_root=_first_field(p, "vfsmount", "mnt_root"),
    )


def maple_layout(p: Profile) -> MapleLayout | None:
    if not p.has_type("maple_tree") or not p.has_type("maple_node"):
        return None
    try:
        mr64 = p.offset_of("maple_node", "mr64")
        ma64 = p.offset_of("maple_node", "ma64")
        range_slot, range_slots = _array(p, "maple_range_64", "slot")
        arange_slot, arange_slots = _array(p, "maple_arange_64", "slot")
        dense_slot, dense_slots = _array(p, "maple_node", "slot")
        range_pivot, range_pivots = _array(p, "maple_range_64", "pivot")
        arange_pivot, arange_pivots = _array(p, "maple_arange_64", "pivot")
        end = p.offset_of("maple_metadata", "end")
        range_meta = p.offset_of("maple_range_64", "meta") + end
        arange_meta = p.offset_of("maple_arange_64", "meta") + end
    except SymbolNotFound:
        return None
    return MapleLayout(
        tree_root=p.offset_of("maple_tree", "ma_root"),
        tree_flags=p.offset_of("maple_tree", "ma_flags"),
        node_size=p.size_of("maple_node"),
        node_parent=p.offset_of("maple_node", "parent"),
        range_slot=mr64 + range_slot,
        range_slots=range_slots,
        arange_slot=ma64 + arange_slot,
        arange_slots=arange_slots,
        dense_slot=dense_slot,
        dense_slots=dense_slots,
        range_pivot=mr64 + range_pivot,
        range_pivots=range_pivots,
        arange_pivot=ma64 + arange_pivot,
        arange_pivots=arange_pivots,
        range_meta=mr64 + range_meta,
        arange_meta=ma64 + arange_meta,
    )
