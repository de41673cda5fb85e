"""Every script in benchmarks/ runs at its smallest size, so a change to the library cannot silently break one.

The numbers themselves are not checked (they depend on the CPU); only that each script finishes and
prints the figures it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALLEST = {
    # the full-size configuration: the larger networks, with the smallest batch
    "bench_training.py": ["--configs", "full", "--precisions", "fp32", "--layouts", "nchw", "--repeats", "1",
                          "--batch", "1"],
    "bench_downstream.py": ["--repeats", "1", "--sizes", "cpu", "--precisions", "fp32"],
    "bench_preprocess.py": ["--cases", "1"],
    "bench_grade.py": ["--vertebrae", "3", "--sizes", "cpu"],
    "bench_pipeline.py": ["--work", "repo", "--target", "preprocess", "--set", "phantom.cases=2", "--set", "phantom.vertebrae_per_case=[4,4]",
                          "--set", "tracking.enabled=false"],
}


def test_every_benchmark_has_a_smoke_run() -> None:
    assert sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py")) == sorted(SMALLEST)


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_benchmark_runs_at_its_smallest_size(script: str, tmp_path: Path) -> None:
    env = os.environ | {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *SMALLEST[script]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if script == "bench_training.py":
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert [row["config"] for row in rows] == ["full"]
        assert all(row["samples_per_s"] > 0 and row["gflop_per_sample_train_step"] > 0 for row in rows)
    else:
        assert " s" in done.stdout, done.stdout
