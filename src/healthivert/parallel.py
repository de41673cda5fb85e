"""Per-case work on every CPU core: the phantom and preprocessing handle one case per process.

Results come back in the order of the inputs, so an output does not depend on the number of cores.
Workers are spawned (not forked): a stage's parent process may hold MLflow threads and connections.
A worker's :class:`~healthivert.errors.HealthiVertError` reaches the caller unchanged.

The number of processes is the container's CPU share: the cores this process may run on, capped by a
cgroup CPU quota (a Kubernetes CPU limit) and by ``HEALTHIVERT_WORKERS`` when set (``1`` runs every
case in the stage's own process).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from healthivert.errors import ConfigError

Item = TypeVar("Item")
Result = TypeVar("Result")

WORKERS_ENV = "HEALTHIVERT_WORKERS"
_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


def _cgroup_cpu_quota() -> float | None:
    """CPUs the cgroup's quota allows (quota / period), or ``None`` without a readable quota."""
    try:
        if _CGROUP_V2_MAX.is_file():
            quota, period = _CGROUP_V2_MAX.read_text().split()[:2]
        else:
            quota = (_CGROUP_V1 / "cpu.cfs_quota_us").read_text().strip()
            period = (_CGROUP_V1 / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Processes for per-case work: the cores this process may use, within a cgroup CPU quota and ``HEALTHIVERT_WORKERS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    setting = os.environ.get(WORKERS_ENV)
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ConfigError(WORKERS_ENV, f"must be a whole number of processes, 1 or more, got {setting!r}")
        cores = min(cores, int(setting))
    return cores


def map_cases(function: Callable[[Item], Result], items: Sequence[Item], desc: str,
              workers: int | None = None) -> Iterator[Result]:
    """``function`` over ``items``, in worker processes, yielding results in input order under a progress bar.

    Args:
        function: a module-level (picklable) function of one item.
        items: the work, one item per case (picklable).
        desc: progress bar label.
        workers: processes to use; default one per available core. With one worker (or one item)
            the work runs in this process.
    """
    workers = min(workers or available_cores(), len(items))
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=None)
    try:
        if workers <= 1:
            for item in items:
                yield function(item)
                bar.update()
            return
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            for result in pool.map(function, items):
                yield result
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
