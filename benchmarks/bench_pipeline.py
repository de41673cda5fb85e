"""Time the whole default pipeline from scratch: ``dvc repro`` in a fresh clone, stage by stage.

Usage: ``python benchmarks/bench_pipeline.py [--work DIR] [--set KEY=VALUE ...] [--target STAGE]``.

The repository's committed ``HEAD`` is cloned into ``DIR`` (a new temporary folder by default), the
``--set`` values are written into its ``params.yaml`` (e.g. ``--set phantom.seed=1``), and ``dvc repro``
(or ``dvc repro STAGE``: that stage and those before it) runs there with this Python environment, so
nothing is cached. Each stage's wall time is read from
when DVC starts it, so it includes the process start, MLflow logging and DVC hashing its outputs.
Prints one line per stage and the total; the clone keeps the run's metrics and report.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^Running stage '(?:.*:)?([\w-]+)'")


def _set_params(params_file: Path, settings: list[str]) -> None:
    """Write ``KEY=VALUE`` settings (dotted keys, YAML values) into ``params_file``."""
    params = yaml.safe_load(params_file.read_text())
    for setting in settings:
        key, _, value = setting.partition("=")
        *parents, leaf = key.split(".")
        section = params
        for name in parents:
            section = section[name]
        if leaf not in section:
            raise SystemExit(f"--set {setting}: {key} is not in params.yaml")
        section[leaf] = yaml.safe_load(value)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder to clone into (default: a new temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter to change")
    parser.add_argument("--target", help="reproduce up to this stage only (default: the whole pipeline)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pipeline-")) / "repo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(work)], check=True)
    if args.set:
        _set_params(work / "params.yaml", args.set)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    command = ["dvc", "repro", *([args.target] if args.target else [])]
    with subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            match = STAGE_LINE.match(line)
            if match:
                marks.append((match.group(1), time.perf_counter() - started))
    total = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"dvc repro failed ({process.returncode}) in {work}")
    ends = [start for _, start in marks[1:]] + [total]
    for (stage, start), end in zip(marks, ends):
        print(f"{stage:<14} {end - start:7.1f} s")
    print(f"{'total':<14} {total:7.1f} s  ({total / 60:.1f} min) in {work}")


if __name__ == "__main__":
    main()
