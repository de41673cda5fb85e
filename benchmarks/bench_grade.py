"""Time ``healthivert grade`` on one phantom spine: files in -> report out, wall time and peak memory.

Usage: ``python benchmarks/bench_grade.py [--vertebrae N [N ...]] [--sizes cpu full]``.

The grader bundle holds untrained networks of each size (the time does not depend on the weights; the
generator's segmentation head keeps every restored row, so each vertebra is graded and mapped back):
``cpu`` with ``params.yaml``, ``full`` with ``configs/full.yaml`` layered on top (two views). The
phantom generator draws at most 12 labelled vertebrae per spine, so a 17-vertebra spine is
extrapolated: each run's time x 17 / N (the fixed costs, start-up and imports, are scaled too, so it
errs high), and, given two counts or more, a line fitted through the runs (fixed + per-vertebra time). ``grade`` runs in a child process, so its peak memory is its own; its
CPU time (user + system) is printed beside the wall time, which on a shared machine also counts the
time other processes held the cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from healthivert.config import PhantomParams, load_params
from healthivert.grading.model import GradingModel
from healthivert.inference.bundle import write_bundle
from healthivert.models import HealthiVertGenerator
from healthivert.models.classifier import FractureClassifier
from healthivert.models.io import save_classifier, save_generator, view_file_name
from healthivert.phantom.generator import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def untrained_bundle(out: Path, size: str) -> Path:
    """A grader bundle of untrained networks of one size."""
    files = [ROOT / "params.yaml"] + ([ROOT / "configs" / "full.yaml"] if size == "full" else [])
    params = load_params(files, ["tracking.enabled=false", "synthesize.device=cpu"])
    models = out / f"models_{size}"
    for view in params.synthesize.views:
        generator = HealthiVertGenerator(params.model)
        with torch.no_grad():  # segment every restored row: measurable bodies, so every vertebra is graded
            generator.fine.seg_head.weight.zero_()
            generator.fine.seg_head.bias.fill_(8.0)
        save_generator(models / view_file_name("generator.pt", view), generator, params.model,
                       extra={"stage": "fine", "view": view})
        (models / view_file_name("model_card.json", view)).write_text(json.dumps({"name": f"untrained {size}"}))
    save_classifier(models / "classifier.pt", FractureClassifier(params.model), params.model)
    svm = GradingModel(("rhlv_max",), (0, 1), np.zeros(1), np.ones(1), np.ones((1, 1)), np.array([-0.2]), 1.0)
    svm.save(models / "svm.json")
    return write_bundle(out / f"grader_{size}", params, models, models, models, {"source": "untrained (benchmark)"})


def grade_once(raw: Path, bundle: Path, out: Path) -> tuple[int, float, float, float]:
    """Graded vertebrae, wall seconds, CPU seconds (user + system) and peak memory (GiB) of one ``grade`` run."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "healthivert.cli", "grade", "--input", str(raw), "--model", str(bundle),
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(done.stderr[-2000:])
    rows = len(next(out.glob("*/grades.csv")).read_text().splitlines()) - 1
    cpu_seconds = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return rows, seconds, cpu_seconds, cpu_after.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vertebrae", type=int, nargs="+", default=[6, 12],
                        help="labelled vertebrae of each phantom spine (<= 12); two or more counts fit fixed + per-vertebra time")
    parser.add_argument("--sizes", nargs="+", default=["cpu", "full"], choices=["cpu", "full"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for count in args.vertebrae:
            write_dataset(root / f"raw_{count}", PhantomParams(cases=1, seed=5, vertebrae_per_case=(count, count),
                                                               spacing_mm_range=(1.0, 1.0), orientations=("RAS",)))
        for size in args.sizes:
            bundle = untrained_bundle(root, size)
            mib = sum(p.stat().st_size for p in bundle.iterdir()) / 2**20
            runs = []
            for count in args.vertebrae:
                rows, seconds, cpu_seconds, peak_gib = grade_once(root / f"raw_{count}", bundle,
                                                                  root / f"out_{size}_{count}")
                runs.append((rows, seconds, cpu_seconds))
                scale = 17 / max(rows, 1)
                print(f"{size}: {rows} vertebrae, files in -> report out {seconds:.1f} s ({cpu_seconds:.1f} s of CPU), "
                      f"{seconds * scale:.1f} s ({cpu_seconds * scale:.1f} s of CPU) scaled to 17 vertebrae, peak memory "
                      f"{peak_gib:.2f} GiB (largest child so far), bundle {mib:.1f} MiB")
            if len({rows for rows, _, _ in runs}) > 1:
                counts = np.array([rows for rows, _, _ in runs], dtype=float)
                for label, column in (("wall", 1), ("CPU", 2)):
                    slope, fixed = np.polyfit(counts, [run[column] for run in runs], 1)
                    print(f"{size}: {label} {fixed:.1f} s fixed + {slope:.2f} s per vertebra -> "
                          f"{fixed + 17 * slope:.1f} s for 17 vertebrae")


if __name__ == "__main__":
    main()
