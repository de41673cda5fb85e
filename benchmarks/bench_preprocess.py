"""Time the phantom and ``preprocess`` per case, side by side for worker counts, and ``heights`` per vertebra.

Usage: ``python benchmarks/bench_preprocess.py [--cases N] [--seed S] [--workers 1,2] [--work DIR]``.
For each worker count (``HEALTHIVERT_WORKERS``) it generates a phantom dataset (default parameters,
``N`` cases) and preprocesses it with the default ``params.yaml`` settings (tracking off); then it runs
the ``heights`` tool on every phantom mask. Prints wall seconds and CPU seconds (this process and its
workers: the machine may be shared), the height error against the phantom truth, and the peak traced
memory of the ``heights`` phase (this process only).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

from healthivert.config import PhantomParams, load_params
from healthivert.parallel import WORKERS_ENV, available_cores
from healthivert.phantom.generator import write_dataset
from healthivert.stages import heights, preprocess

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    """Peak traced memory since the last reset, in MiB."""
    return tracemalloc.get_traced_memory()[1] / 2**20


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished workers."""
    usages = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    params = load_params(ROOT / "params.yaml", ["tracking.enabled=false"])
    phantom = PhantomParams(**(params.phantom.model_dump() | {"cases": args.cases, "seed": args.seed}))
    for requested in args.workers.split(","):
        os.environ[WORKERS_ENV] = requested
        workers = available_cores()
        raw = work / f"raw-{workers}"
        start, cpu = time.perf_counter(), _cpu_seconds()
        write_dataset(raw, phantom)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        print(f"phantom, {workers} worker(s): {args.cases} cases, {seconds:.1f} s wall, {cpu:.1f} s CPU "
              f"({seconds / args.cases:.2f} s/case wall)")
        start, cpu = time.perf_counter(), _cpu_seconds()
        metrics = preprocess.run(params, raw, work / f"preprocessed-{workers}", raw / "grades.csv")
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        print(f"preprocess, {workers} worker(s): {args.cases} cases, {metrics['vertebrae']:.0f} vertebrae, "
              f"{seconds:.1f} s wall, {cpu:.1f} s CPU ({seconds / args.cases:.2f} s/case wall), "
              f"crop-height MAE vs truth {metrics['truth_height_mae_mm']:.2f} mm")

    tracemalloc.start()
    errors, vertebrae = [], 0
    start, cpu = time.perf_counter(), time.process_time()
    for case_dir in sorted((raw / "derivatives").iterdir()):
        case = case_dir.name
        table = heights.run(case_dir / f"{case}_seg-vert_msk.nii.gz", work / "heights" / f"{case}.csv",
                            case_dir / f"{case}_seg-subreg_ctd.json")
        truth = pd.read_csv(raw / "truth" / case / f"{case}_heights.csv")
        merged = table[table["status"] == "ok"].merge(truth, on="vertebra", suffixes=("", "_truth"))
        vertebrae += len(table)
        for third in ("ant", "mid", "post"):
            errors += list((merged[f"h_{third}_mm"] - merged[f"h_{third}_mm_truth"]).abs())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"heights: {vertebrae} vertebrae, {seconds:.1f} s wall, {cpu:.1f} s CPU "
          f"({seconds / vertebrae:.3f} s/vertebra wall, {cpu / vertebrae:.3f} s/vertebra CPU), "
          f"peak traced memory {_peak_mib():.0f} MiB, MAE vs truth {np.mean(errors):.2f} mm")
    tracemalloc.stop()
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
