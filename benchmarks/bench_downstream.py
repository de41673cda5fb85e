"""Time the downstream stages: RHLV per vertebra, synthesis per vertebra, SVM fit.

Usage: ``python benchmarks/bench_downstream.py [--repeats N] [--sizes cpu full] [--precisions fp32 bf16]``.

- RHLV: sagittal + coronal RHLV and the height-loss map of one vertebra, on the real straightened
  VerSe'19 labels of ``../shared/data`` (256 x 256 x 64) when present, and on a default-size crop
  (``preprocess.crop_shape``) with an anterior wedge.
- Synthesis: one vertebra with a neighbour above and below, one view (sagittal), iterative (3
  batched generator passes) and single-pass, for each model size and precision, each size on its
  configuration's crop and synthesis settings (``cpu``: ``params.yaml``; ``full``: with
  ``configs/full.yaml``, 256 x 256 x 64). The generator is untrained: the time does not depend on
  the weights.
- SVM: holdout fit (C chosen on val over the default grid) on 1,460 vertebrae (VerSe'19's size).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from healthivert.config import SvmFitParams, load_params
from healthivert.grading import fit_grader
from healthivert.io.nifti import load_volume
from healthivert.models import HealthiVertGenerator
from healthivert.rhlv import compute_rhlv, compute_rhlv_coronal, height_loss_map
from healthivert.synthesis.iterative import prepare_for_synthesis, synthesise_vertebra

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STRAIGHTENED = ROOT.parent / "shared" / "data" / "verse19-sample" / "straightened" / "label"


def best_of(function, repeats: int) -> float:
    """Best wall-clock time of ``repeats`` calls, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def spine_crop(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Windowed CT and body labels ``(CC, AP, LR)`` of three 26-row box vertebrae (20, 21, 22), target centred."""
    label = np.zeros(shape, dtype=np.uint8)
    centre, depth, width = shape[0] // 2, 36, min(40, shape[2] - 8)
    ap0, lr0 = (shape[1] - depth) // 2, (shape[2] - width) // 2
    for vertebra, offset in ((20, -34), (21, 0), (22, 34)):
        top = centre + offset - 13
        label[top:top + 26, ap0:ap0 + depth, lr0:lr0 + width] = vertebra
    label[centre - 13:centre - 3, ap0:ap0 + depth // 3, lr0:lr0 + width] = 0  # anterior wedge of the target
    ct = np.where(label > 0, 180, 60).astype(np.float32)
    return ct, label


def bench_rhlv(crop_shape: tuple[int, int, int], repeats: int) -> None:
    """RHLV (both views) and the loss map of one vertebra."""
    cases = []
    if STRAIGHTENED.is_dir():
        for path in sorted(STRAIGHTENED.glob("0007_*.nii.gz")):
            vertebra = int(path.name.split("_")[1].split(".")[0])
            mask = load_volume(path, label=True).array == vertebra
            cases.append((f"VerSe'19 {path.name} {mask.shape}", mask, mask))
    _, label = spine_crop(crop_shape)
    healthy = np.zeros_like(label, dtype=bool)
    healthy[label.shape[0] // 2 - 13:label.shape[0] // 2 + 13] = (label == 21).any(axis=0)
    cases.append((f"default crop {crop_shape}", healthy, label == 21))

    def measure(syn: np.ndarray, ori: np.ndarray) -> None:
        compute_rhlv(syn, ori, (1.0, 1.0, 1.0))
        compute_rhlv_coronal(syn, ori, (1.0, 1.0, 1.0))
        height_loss_map(syn, ori, (1.0, 1.0, 1.0))

    for name, syn, ori in cases:
        print(f"rhlv   {name}: {1000 * best_of(lambda: measure(syn, ori), repeats):.1f} ms per vertebra")


def bench_synthesis(sizes: list[str], precisions: list[str], repeats: int) -> None:
    """One-view synthesis of one vertebra per model size, precision and mode (iterative or not)."""
    device = torch.device("cpu")
    for size in sizes:
        params = load_params([ROOT / "params.yaml", *([CONFIGS / "full.yaml"] if size == "full" else [])])
        crop_shape = tuple(params.preprocess.crop_shape)
        ct, label = spine_crop(crop_shape)
        cam = np.zeros(crop_shape, dtype=np.float32)
        torch.manual_seed(0)
        generator = prepare_for_synthesis(HealthiVertGenerator(params.model))
        for precision in precisions:
            dtype = torch.bfloat16 if precision == "bf16" else None
            for iterative in (True, False):
                settings = params.synthesize.model_copy(update={"views": ("sagittal",), "iterative": iterative})

                def run() -> None:
                    synthesise_vertebra({"sagittal": generator}, ct, label, cam, 21, (20, 22), settings, 1.0, device,
                                        dtype)

                run()  # warm-up (allocator, oneDNN kernels)
                seconds = best_of(run, repeats)
                mode = "iterative" if iterative else "single pass"
                print(f"synth  size={size} {precision} {mode}: {seconds:.2f} s per vertebra (crop {crop_shape}, "
                      f"sagittal, slice_fraction {settings.slice_fraction}, {torch.get_num_threads()} threads)")


def bench_svm(repeats: int) -> None:
    """Holdout fit of the grader on a VerSe'19-sized table."""
    rng = np.random.default_rng(0)
    n = 1460
    loss = np.concatenate([rng.uniform(0, 0.18, 1172), rng.uniform(0.2, 0.25, 141), rng.uniform(0.25, 0.4, 96),
                           rng.uniform(0.4, 0.6, 51)])
    table = pd.DataFrame({
        "case": [f"sub-{i // 8:03d}" for i in range(n)], "vertebra": np.arange(n) % 8 + 8,
        "split": rng.choice(["train", "val", "test"], n, p=[0.5, 0.25, 0.25]),
        "grade": pd.array(np.digitize(loss, [0.2, 0.25, 0.4]), dtype="Int64"),
        "rhlv_ant": loss + rng.normal(0, 0.02, n), "rhlv_mid": 0.5 * loss + rng.normal(0, 0.02, n),
        "rhlv_post": rng.normal(0, 0.02, n)})
    table["rhlv_max"] = table[["rhlv_ant", "rhlv_mid", "rhlv_post"]].max(axis=1)
    seconds = best_of(lambda: fit_grader(table, SvmFitParams()), repeats)
    print(f"svm    holdout fit, {n} vertebrae, {len(SvmFitParams().c_grid)} C values: {seconds:.2f} s")


def main() -> None:
    """Run the benchmarks and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["cpu", "full"], choices=["cpu", "full"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["rhlv", "synthesis", "svm"])
    args = parser.parse_args()
    crop_shape = tuple(load_params(ROOT / "params.yaml").preprocess.crop_shape)
    if "rhlv" not in args.skip:
        bench_rhlv(crop_shape, args.repeats)
    if "svm" not in args.skip:
        bench_svm(args.repeats)
    if "synthesis" not in args.skip:
        bench_synthesis(args.sizes, args.precisions, args.repeats)


if __name__ == "__main__":
    main()
