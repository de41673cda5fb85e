"""Per-case work on every CPU core: the phantom and preprocessing handle one case per process.

Results come back in the order of the inputs, so an output does not depend on the number of cores.
Workers are spawned (not forked): a stage's parent process may hold MLflow threads and connections.
A worker's :class:`~healthivert.errors.HealthiVertError` reaches the caller unchanged.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> int:
    """CPU cores this process may run on (the container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
