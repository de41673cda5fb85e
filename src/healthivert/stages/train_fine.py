"""Stage 3, ``healthivert train-fine``: the whole generator (coarse + fine), coarse initialised from stage 2.

Trains on the train split's vertebrae of grade <= 1 with the attention maps of stage 2, compares the
result on the val split's healthy vertebrae with the neighbour baselines, and writes ``--out``
(``generator.pt``, ``model_card.json``, ``samples/``, ``params.yaml``). Resumes automatically from
``--checkpoint-dir``; under ``torchrun`` rank 0 alone writes the outputs.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from healthivert.config import Params
from healthivert.data.manifest import MANIFEST_NAME, read_manifest
from healthivert.errors import InputDataError
from healthivert.models.io import load_generator
from healthivert.stages.common import add_metrics_argument, add_params_arguments, params_from_args, write_metrics
from healthivert.stages.train_coarse import SAMPLES, barrier, report_model, training_digest, write_model_folder
from healthivert.tracking.runs import StageTracker, stage_run
from healthivert.training.checkpoint import file_digest
from healthivert.training.figures import FolderSink
from healthivert.training.generator import train_generator
from healthivert.training.runtime import runtime_for


SECTIONS = ("model", "train_fine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags of the stage."""
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="preprocess output (manifest.parquet + crops)")
    parser.add_argument("--attention", type=Path, required=True, metavar="DIR", help="attention maps of train-coarse")
    parser.add_argument("--coarse", type=Path, required=True, metavar="DIR", help="train-coarse model folder (generator.pt)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder (replaced whole)")
    parser.add_argument("--checkpoint-dir", type=Path, required=True, metavar="DIR",
                        help="training checkpoints; a run resumes from it automatically (keep it between runs)")
    add_params_arguments(parser)
    add_metrics_argument(parser)


def run(params: Params, data: Path, attention: Path, coarse: Path, out: Path, checkpoint_dir: Path,
        tracker: StageTracker | None = None) -> dict[str, float]:
    """Train the whole generator from the coarse one; returns the metrics."""
    manifest = read_manifest(data)
    if params.model.attention_module and not (attention / "index.parquet").is_file():
        raise InputDataError(attention, "attention maps not found (no index.parquet)", "run 'healthivert train-coarse' first")
    train = params.train_fine
    coarse_model = coarse / "generator.pt"
    with runtime_for(train.device, train.precision, train.cpu_threads) as runtime:
        initial = load_generator(coarse_model, "cpu", expected=params.model)
        data_digest = file_digest(data / MANIFEST_NAME) + "+" + file_digest(coarse_model)
        params_digest = training_digest(params, train, "fine", data_digest)
        start = time.perf_counter()
        samples = checkpoint_dir / SAMPLES
        sink = FolderSink(checkpoint_dir, tracker) if runtime.is_main else None
        result = train_generator(manifest, data, attention, params.model, train, "fine", runtime, checkpoint_dir,
                                 params_digest, sink, initial=initial)
        metrics = dict(result.metrics)
        metrics["seconds"] = time.perf_counter() - start
        if runtime.is_main:
            training = {"steps": result.fit.step, "resumed_from_step": result.fit.resumed_from,
                        "seconds": round(metrics["seconds"], 1), "device": str(runtime.device),
                        "processes": runtime.world_size, "autocast": str(runtime.autocast_dtype),
                        "validation_slices": result.validation_count, "initialised_from": str(coarse_model)}
            write_model_folder(out, params, "fine", result, manifest, data, data_digest, params_digest, metrics,
                               training, samples)
            report_model(tracker, out, result, "generator", "fine", metrics)
        barrier(runtime)
    return metrics


def execute(args: argparse.Namespace) -> None:
    """Run the stage from parsed arguments."""
    params = params_from_args(args)
    with stage_run("train-fine", params, SECTIONS) as tracker:
        metrics = run(params, args.data, args.attention, args.coarse, args.out, args.checkpoint_dir, tracker)
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    write_metrics(args.metrics, metrics)
