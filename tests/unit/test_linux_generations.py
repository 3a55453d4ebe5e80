"""What differs between kernel generations, each chosen from the profile, not a version.

Each test names one difference the lab's 5.10, 6.1, 6.12 and newest kernels
showed, and checks the small piece of code that handles it. The kallsyms
table layouts are in test_kallsyms.py; thread lists, `state`/`__state` and
VMA lists/maple trees on synthetic kernels of each layout in
test_linux_tasks.py, test_linux_states.py and test_linux_vmas.py.
"""

from __future__ import annotations

import copy

from tests.support.isf import Variant, tiny_isf
from tests.support.profiles import real_61
from vmishell.os.linux.layout import task_layout
from vmishell.os.linux.tasks import PF_KTHREAD, PF_WQ_WORKER, shows_full_name
from vmishell.symbols.profile import Profile


def test_kernel_threads_show_their_full_name_workers_only_with_format_worker_id() -> None:
    """6.10+ wq_worker_comm() shows a rescuer as "kworker/R-mm_percpu_wq", its full
    kthread name; before, it showed the truncated comm plus the work it serves."""
    kthread, worker = PF_KTHREAD, PF_KTHREAD | PF_WQ_WORKER
    assert shows_full_name(kthread, worker_full_id=False)
    assert shows_full_name(kthread, worker_full_id=True)
    assert not shows_full_name(worker, worker_full_id=False)
    assert shows_full_name(worker, worker_full_id=True)
    assert not shows_full_name(0, worker_full_id=True)  # a user process: always its comm


def test_format_worker_id_in_the_profile_selects_the_worker_naming() -> None:
    assert not task_layout(real_61()).worker_full_id  # Debian's 6.1 has no format_worker_id
    isf = copy.deepcopy(tiny_isf(Variant()))
    assert not task_layout(Profile.from_isf(isf, "tiny")).worker_full_id
    isf["symbols"]["format_worker_id"] = {"address": 0xFFFFFFFF81234560}
    assert task_layout(Profile.from_isf(isf, "tiny-with-format_worker_id")).worker_full_id
