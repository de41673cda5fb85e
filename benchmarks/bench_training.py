"""Training throughput of one whole GAN step (three discriminators, then the generator), per configuration.

For each configuration (``cpu``: 128 x 128 slices, batch 8; ``full``: 256 x 256, batch 4) and each
variant (float32 / bfloat16 autocast, NCHW / channels-last) it times full training steps of stage
``fine`` (coarse + fine generator) on random tensors, reports samples/s (best of ``--repeats``
timed steps after a warm-up, since other processes share the machine), the peak resident memory
added by the run, the forward GFLOP per sample of each network (:mod:`healthivert.models.complexity`),
the GFLOP of a whole training step counted by ``torch.utils.flop_counter`` (generator forward and
backward, three discriminator forwards, two weight-gradient and one input-gradient backward), and
the achieved GFLOP/s. ``--profile`` prints the torch.profiler table of the slowest operators.

    python benchmarks/bench_training.py --configs cpu full --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from healthivert.config import LossWeights, ModelParams
from healthivert.data.samples import make_sample
from healthivert.models.complexity import flops_per_sample
from healthivert.models.discriminator import Discriminators
from healthivert.models.generator import HealthiVertGenerator
from healthivert.training.gan import InpaintingTask
from healthivert.training.runtime import Runtime

SHAPES = {"cpu": (128, 8), "full": (256, 4)}


def synthetic_batch(size: int, batch: int, max_height: int) -> dict[str, torch.Tensor]:
    """A training batch built by the dataset's own :func:`~healthivert.data.samples.make_sample`.

    Each slice holds three box vertebrae (the middle one, the target, wedge-shaped and lower than its
    neighbours) on random soft tissue, so the batch carries every key the training step reads.
    """
    generator = np.random.default_rng(0)
    height = max_height * 2 // 3
    samples = []
    for _ in range(batch):
        ct = generator.integers(40, 90, (size, size), dtype=np.uint8)
        labels = np.zeros((size, size), np.int16)
        top = size // 2 - height // 2 - height - 4
        for vertebra, row in zip((19, 20, 21), (top, top + height + 4, top + 2 * height + 8)):
            rows = height if vertebra != 20 else height - height // 4
            labels[row:row + rows, size // 4:3 * size // 4] = vertebra
        ct[labels > 0] = 180
        sample = make_sample(ct, labels, 20, None, float(generator.uniform(-0.8, 0.8)), max_height)
        samples.append({key: torch.from_numpy(value) for key, value in sample.items()})
    return default_collate(samples)


def measure(config: str, precision: str, channels_last: bool, repeats: int, do_profile: bool,
            batch_size: int | None = None) -> dict[str, float | str]:
    """Time whole training steps of one configuration and variant (``batch_size`` overrides the configuration's)."""
    size, default_batch = SHAPES[config]
    batch_size = batch_size or default_batch
    model_params = ModelParams(size=config)
    torch.manual_seed(0)
    runtime = Runtime(torch.device("cpu"), autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    generator, discriminators = HealthiVertGenerator(model_params), Discriminators(model_params)
    forward_gflop = {"generator": flops_per_sample(generator, (size, size)) / 1e9,
                     "discriminators": flops_per_sample(discriminators, (size, size)) / 1e9}
    task = InpaintingTask(generator, discriminators, model_params, LossWeights(), "fine", 2e-4, 0.5, 1, 1,
                          runtime, channels_last=channels_last)
    batch = synthetic_batch(size, batch_size, model_params.max_height_px)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with FlopCounterMode(display=False) as counter:  # also the warm-up: oneDNN kernel selection, allocator
        task.train_step(batch)
    gflop = counter.get_total_flops() / 1e9 / batch_size
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        task.train_step(batch)
        times.append(time.perf_counter() - start)
    if do_profile:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            task.train_step(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    best = min(times)
    return {"config": config, "precision": precision, "channels_last": str(channels_last),
            "image": f"{size}x{size}", "batch": batch_size, "step_s_best": round(best, 3),
            "step_s_median": round(sorted(times)[len(times) // 2], 3),
            "samples_per_s": round(batch_size / best, 2),
            "gflop_per_sample_forward": {k: round(v, 2) for k, v in forward_gflop.items()},
            "gflop_per_sample_train_step": round(gflop, 2),
            "achieved_gflop_s": round(gflop * batch_size / best, 1),
            "peak_rss_added_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1)}


def main() -> None:
    """Parse flags, run every configuration and variant, print a table and JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["cpu", "full"], choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, help="batch size (default: the configuration's)")
    parser.add_argument("--profile", action="store_true", help="print the torch.profiler table of each variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for config in args.configs:
        for precision in args.precisions:
            for layout in args.layouts:
                result = measure(config, precision, layout == "channels_last", args.repeats, args.profile,
                                 args.batch)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
