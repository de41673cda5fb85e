"""Time ``healthivert grade`` on one phantom spine: files in -> report out, wall time and peak memory.

Usage: ``python benchmarks/bench_grade.py [--vertebrae N] [--sizes cpu full]``.

The grader bundle holds untrained networks of each size (the time does not depend on the weights; the
generator's segmentation head keeps every restored row, so each vertebra is graded and mapped back):
``cpu`` with ``params.yaml``, ``full`` with ``configs/full.yaml`` layered on top (two views). The
phantom generator draws at most 12 labelled vertebrae per spine; the per-vertebra time scales the
figure to a 17-vertebra spine (whole time x 17 / N: the fixed costs, start-up and imports, are scaled
too, so the figure errs high). ``grade`` runs in a child process, so its peak memory is its own; its
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vertebrae", type=int, default=12, help="labelled vertebrae of the phantom spine (<= 12)")
    parser.add_argument("--sizes", nargs="+", default=["cpu", "full"], choices=["cpu", "full"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_dataset(root / "raw", PhantomParams(cases=1, seed=5, vertebrae_per_case=(args.vertebrae,) * 2,
                                                  spacing_mm_range=(1.0, 1.0), orientations=("RAS",)))
        for size in args.sizes:
            bundle = untrained_bundle(root, size)
            mib = sum(p.stat().st_size for p in bundle.iterdir()) / 2**20
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "healthivert.cli", "grade", "--input", str(root / "raw"),
                                   "--model", str(bundle), "--out", str(root / f"out_{size}"), "--device", "cpu"],
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_seconds = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
            if done.returncode != 0:
                sys.exit(done.stderr[-2000:])
            table = next((root / f"out_{size}").glob("*/grades.csv")).read_text().splitlines()
            peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            scale = 17 / max(len(table) - 1, 1)
            print(f"{size}: {len(table) - 1} vertebrae, files in -> report out {seconds:.1f} s "
                  f"({cpu_seconds:.1f} s of CPU), {seconds * scale:.1f} s ({cpu_seconds * scale:.1f} s of CPU) scaled "
                  f"to 17 vertebrae, peak memory {peak_gib:.2f} GiB (largest child so far), bundle {mib:.1f} MiB")


if __name__ == "__main__":
    main()
