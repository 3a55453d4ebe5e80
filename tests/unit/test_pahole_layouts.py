"""pahole's C view of DWARF, read into layouts: the ground truth profiles are held against."""

from __future__ import annotations

import subprocess

from test_btf import HOST_BTF, need_host_btf_and_pahole  # tests/unit is on sys.path

from vmishell.lab.pahole import parse_layouts

# Cut from `pahole -F dwarf -C vm_area_struct,task_struct` on Debian's 6.1 amd64 vmlinux.
VMA = """\
struct vm_area_struct {
\tlong unsigned int          vm_start;             /*     0     8 */
\tlong unsigned int          vm_end;               /*     8     8 */
\tpgprot_t                   vm_page_prot;         /*    24     8 */
\tunion {
\t\tstruct {
\t\t\tstruct rb_node rb __attribute__((__aligned__(8))); /*    40    24 */
\t\t\t/* --- cacheline 1 boundary (64 bytes) --- */
\t\t\tlong unsigned int rb_subtree_last; /*    64     8 */
\t\t} __attribute__((__aligned__(8))) shared __attribute__((__aligned__(8))); /*    40    32 */
\t\tstruct anon_vma_name * anon_name;        /*    40     8 */
\t} __attribute__((__aligned__(8)));               /*    40    32 */
\tconst struct vm_operations_struct  * vm_ops;     /*    96     8 */
\tvoid                       (*fn)(struct vm_area_struct *, int); /*   104     8 */
\tchar                       comm[16];             /*   112    16 */

\t/* size: 152, cachelines: 3, members: 15 */
\t/* forced alignments: 1 */
} __attribute__((__aligned__(8)));
struct task_struct {
\tunsigned int               sched_reset_on_fork:1; /*  2340: 0  4 */
\tunsigned int               sched_contributes_to_load:1; /*  2340: 1  4 */

\t/* XXX 30 bits hole, try to pack */

\t/* size: 9792, cachelines: 153, members: 2 */
} __attribute__((__aligned__(64)));
"""


def test_members_of_anonymous_unions_are_the_parents_and_named_ones_are_paths() -> None:
    layouts = parse_layouts(VMA)
    vma = layouts["vm_area_struct"]
    assert vma["size"] == 152
    assert vma["members"] == {
        "vm_start": [0, None, 8],
        "vm_end": [8, None, 8],
        "vm_page_prot": [24, None, 8],
        "shared": [40, None, 32],
        "shared.rb": [40, None, 24],
        "shared.rb_subtree_last": [64, None, 8],
        "anon_name": [40, None, 8],
        "vm_ops": [96, None, 8],
        "fn": [104, None, 8],
        "comm": [112, None, 16],
    }


def test_bitfields_keep_their_bit() -> None:
    task = parse_layouts(VMA)["task_struct"]
    assert task == {
        "size": 9792,
        "members": {
            "sched_reset_on_fork": [2340, 0, 4],
            "sched_contributes_to_load": [2340, 1, 4],
        },
    }


def test_the_host_kernels_layouts_read_through_pahole() -> None:
    """pahole on the host's own BTF: the parser follows the tool's real output."""
    need_host_btf_and_pahole()  # skips on a bare machine, fails under CI=true
    out = subprocess.run(
        ["pahole", "-C", "mm_struct,list_head", str(HOST_BTF)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    layouts = parse_layouts(out)
    assert layouts["list_head"] == {
        "size": 16,
        "members": {"next": [0, None, 8], "prev": [8, None, 8]},
    }
    assert layouts["mm_struct"]["members"]["pgd"][2] == 8
