"""Stage 3, ``healthivert train-fine``: the whole generator (coarse + fine) per view, coarse initialised from stage 2.

For each view of ``train_fine.views``, starting from the coarse generator of the same view in
``--coarse``, trains on the train split's vertebrae of grade <= ``target_max_grade`` with the attention maps of stage 2,
compares the result on the val split's healthy vertebrae with the neighbour baselines, and writes
``--out`` like train-coarse does (per view a generator, model card and sample grids: ``generator.pt``,
``model_card.json``, ``samples/`` for sagittal, ``generator_coronal.pt``, ... for coronal; and
``params.yaml``). Resumes automatically from ``--checkpoint-dir`` (the sagittal run in the folder
itself, the coronal one in ``generator_coronal/``); under ``torchrun`` rank 0 alone writes the outputs.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from healthivert.config import Params, View
from healthivert.data.manifest import MANIFEST_NAME, read_manifest
from healthivert.errors import InputDataError
from healthivert.models.io import generator_file, load_view_generator, view_file_name
from healthivert.stages.common import add_metrics_argument, add_params_arguments, check_outputs, params_from_args, write_metrics
from healthivert.tracking.runs import StageTracker, stage_run
from healthivert.training.checkpoint import file_digest
from healthivert.training.runtime import runtime_for
from healthivert.training.views import (GENERATOR_CHECKPOINTS, barrier, report_model, train_view, views_metrics,
                                        write_model_folder)


SECTIONS = ("model", "train_fine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocess output (manifest.parquet + crops)")
    parser.add_argument("--attention", type=Path, required=True, metavar="DIR", help="attention maps of train-coarse")
    parser.add_argument("--coarse", type=Path, required=True, metavar="DIR",
                        help="train-coarse model folder (a generator per view)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder (replaced whole)")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, metavar="DIR",
                        help="training checkpoints; a run resumes from it automatically (keep it between runs)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def view_checkpoint_dir(checkpoint_dir: Path, view: View) -> Path:
    """A view's checkpoint folder in ``--checkpoint-dir``: ``generator_coronal/``, or for sagittal the folder itself.

    The sagittal run keeps the folder it used before there were views, so its checkpoints still resume.
    """
    return checkpoint_dir if view == "sagittal" else checkpoint_dir / view_file_name(GENERATOR_CHECKPOINTS, view)


def run(params: Params, data: Path, attention: Path, coarse: Path, out: Path, checkpoint_dir: Path,
        tracker: StageTracker | None = None) -> dict[str, float]:
    """Train the whole generator of each view from the coarse one of the same view; returns the metrics."""
    manifest = read_manifest(data)
    if params.model.attention_module and not (attention / "index.parquet").is_file():
        raise InputDataError(attention, "attention maps not found (no index.parquet)", "run 'healthivert train-coarse' first")
    train = params.train_fine
    data_digest = file_digest(data / MANIFEST_NAME)
    start = time.perf_counter()
    with runtime_for(train.device, train.precision, train.cpu_threads) as runtime:
        # every view's coarse generator is checked before any training starts
        starts = {view: (coarse / generator_file(view), load_view_generator(coarse, view, "cpu", params.model)[0])
                  for view in train.views}
        models = [train_view(params, "fine", view, manifest, data, attention, runtime,
                             view_checkpoint_dir(checkpoint_dir, view), data_digest, tracker, start_from=starts[view])
                  for view in train.views]
        metrics = views_metrics(models)
        metrics["seconds"] = time.perf_counter() - start
        if runtime.is_main:
            write_model_folder(out, params, "fine", models, manifest, data, {})
            for model in models:
                report_model(tracker, out, model, "generator", "fine")
        barrier(runtime)
    return metrics


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    check_outputs(folders=[args.out, args.checkpoint_dir], files=[args.metrics])
    with stage_run("train-fine", params, SECTIONS) as tracker:
        metrics = run(params, args.data, args.attention, args.coarse, args.out, args.checkpoint_dir, tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    write_metrics(args.metrics, metrics)
