"""Time ``preprocess`` per case and ``heights`` per vertebra on phantom data, with peak memory.

Usage: ``python benchmarks/bench_preprocess.py [--cases N] [--seed S] [--work DIR]``. Generates a
phantom dataset (default parameters, ``N`` cases), preprocesses it with the default ``params.yaml``
settings (tracking off) and runs the ``heights`` tool on every phantom mask; prints seconds per case,
seconds per vertebra (wall clock and CPU: the machine may be shared), the height error against the phantom truth and the peak traced memory of each
phase.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

from healthivert.config import PhantomParams, load_params
from healthivert.phantom.generator import write_dataset
from healthivert.stages import heights, preprocess

ROOT = Path(__file__).resolve().parents[1]


def _peak_mib() -> float:
    """Peak traced memory since the last reset, in MiB."""
    return tracemalloc.get_traced_memory()[1] / 2**20


def main() -> None:
    """Run the benchmark and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    params = load_params(ROOT / "params.yaml", ["tracking.enabled=false"])
    raw = work / "raw"
    write_dataset(raw, PhantomParams(**(params.phantom.model_dump() | {"cases": args.cases, "seed": args.seed})))

    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    metrics = preprocess.run(params, raw, work / "preprocessed", raw / "grades.csv")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"preprocess: {args.cases} cases, {metrics['vertebrae']:.0f} vertebrae, {seconds:.1f} s wall, {cpu:.1f} s CPU "
          f"({seconds / args.cases:.2f} s/case wall, {cpu / args.cases:.2f} s/case CPU), "
          f"peak traced memory {_peak_mib():.0f} MiB, crop-height MAE vs truth {metrics['truth_height_mae_mm']:.2f} mm")

    tracemalloc.reset_peak()
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
