"""``healthivert rhlv`` on written crops of known height loss: table, maps, metrics and one-line errors.

:func:`write_crops` (also used by the evaluation tests) writes a preprocessed folder following the
contract of ``docs/architecture.md``: box-shaped vertebral bodies whose anterior, middle and
posterior thirds lose known fractions of their height.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from healthivert import cli
from healthivert.config import Params
from healthivert.data.manifest import write_manifest
from healthivert.io.nifti import load_volume, save_volume
from healthivert.stages import rhlv as rhlv_stage
from healthivert.synthesis.index import write_index

#: IPL voxel-to-world matrix at 1 mm (axis 0 inferior, 1 posterior, 2 left).
IPL = np.array([[0, 0, -1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
SHAPE = (64, 32, 16)          # (CC, AP, LR)
BODY_ROWS = 16                # healthy body height
AP_SPAN = (6, 27)             # 21 columns: thirds of 7
LR_SPAN = (3, 13)
TOPS = (6, 26, 46)            # first rows of the bodies above, target, below
NO_PARAMS = ["--set", "tracking.enabled=false"]


def main(argv: list[str]) -> int:
    """``healthivert <argv>`` in-process, loading only the command under test (other stages may be absent)."""
    original = cli.COMMANDS
    cli.COMMANDS = {argv[0]: original[argv[0]]}
    try:
        return cli.main(argv)
    finally:
        cli.COMMANDS = original


def genant(loss: float) -> int:
    """Genant grade of a relative height loss."""
    return int(np.digitize(loss, [0.20, 0.25, 0.40]))


def column_profile(losses: tuple[float, float, float]) -> np.ndarray:
    """Integer heights of the 21 AP columns of a body whose thirds lose ``losses``."""
    return np.repeat(np.rint(BODY_ROWS * (1 - np.asarray(losses))).astype(int), 7)


def crop_labels(vertebra: int, losses: tuple[float, float, float]) -> np.ndarray:
    """Body labels ``(CC, AP, LR)``: ``vertebra - 1`` above, ``vertebra`` (fractured: its tops lowered), ``vertebra + 1`` below."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for vid, top in zip((vertebra - 1, vertebra, vertebra + 1), TOPS):
        heights = column_profile(losses) if vid == vertebra else np.full(21, BODY_ROWS)
        rows = np.arange(SHAPE[0])[:, None]
        column_mask = (rows >= top + BODY_ROWS - heights[None]) & (rows < top + BODY_ROWS)  # inferior endplate fixed
        labels[:, AP_SPAN[0]:AP_SPAN[1], LR_SPAN[0]:LR_SPAN[1]][column_mask[:, :, None].repeat(LR_SPAN[1] - LR_SPAN[0], 2)] = vid
    return labels


def write_crops(root: Path, vertebrae: list[tuple[str, str, int, tuple[float, float, float]]]) -> pd.DataFrame:
    """Write ``label/``, ``healthy_label/``, ``ct/``, ``healthy_ct/``, ``mask/`` and the manifest.

    Args:
        root: the preprocessed folder to create.
        vertebrae: ``(case, split, vertebra, (loss_ant, loss_mid, loss_post))`` per target.

    Returns:
        the manifest (truth losses are those of the written integer column heights).
    """
    records = []
    for case, split, vertebra, losses in vertebrae:
        name = f"{case}_{vertebra}"
        labels, healthy = crop_labels(vertebra, losses), crop_labels(vertebra, (0.0, 0.0, 0.0))
        for kind, array in (("label", labels), ("healthy_label", healthy)):
            save_volume(root / kind / f"{name}.nii.gz", array, IPL)
        for kind, array in (("ct", labels), ("healthy_ct", healthy)):
            save_volume(root / kind / f"{name}.nii.gz", np.where(array > 0, 200, 40).astype(np.uint8), IPL)
        band = np.zeros(SHAPE, dtype=np.uint8)
        band[TOPS[1] - 12:TOPS[1] + BODY_ROWS + 12] = 1
        save_volume(root / "mask" / f"{name}.nii.gz", band, IPL)
        truth = 1 - column_profile(losses).reshape(3, 7).mean(axis=1) / BODY_ROWS
        records.append({
            "case": case, "vertebra": vertebra, "name": f"L{vertebra - 19}", "split": split,
            "grade": genant(float(truth.max())), "fracture_type": "none" if truth.max() == 0 else "wedge",
            "ct_path": f"ct/{name}.nii.gz", "label_path": f"label/{name}.nii.gz", "mask_path": f"mask/{name}.nii.gz",
            "healthy_ct_path": f"healthy_ct/{name}.nii.gz", "healthy_label_path": f"healthy_label/{name}.nii.gz",
            "spacing_mm": 1.0, "hu_lo": -300.0, "hu_hi": 1200.0, "above": vertebra - 1, "below": vertebra + 1,
            "center_row": TOPS[1] + BODY_ROWS // 2, "top_row": TOPS[1], "bottom_row": TOPS[1] + BODY_ROWS - 1,
            "source_layout": "verse", "source": "drawn",
            **{f"truth_h_{t}_mm": float(BODY_ROWS * (1 - truth[i])) for i, t in enumerate(("ant", "mid", "post"))},
            **{f"truth_healthy_h_{t}_mm": float(BODY_ROWS) for t in ("ant", "mid", "post")},
            **{f"truth_loss_{t}": float(truth[i]) for i, t in enumerate(("ant", "mid", "post"))},
        })
    manifest = pd.DataFrame(records)
    write_manifest(manifest, root)
    return manifest


def write_synthesis(root: Path, manifest: pd.DataFrame, source: Path) -> None:
    """A synthesis folder whose labels are the healthy truth (a perfect generator)."""
    for row in manifest.itertuples():
        name = f"{row.case}_{row.vertebra}"
        for kind, column in (("label", "healthy_label_path"), ("ct", "healthy_ct_path")):
            volume = load_volume(source / getattr(row, column), label=True)
            save_volume(root / kind / f"{name}.nii.gz", volume.array.astype(np.uint8), volume.affine)
    write_index(pd.DataFrame({
        "case": manifest["case"], "vertebra": manifest["vertebra"],
        "ct_path": [f"ct/{c}_{v}.nii.gz" for c, v in zip(manifest["case"], manifest["vertebra"])],
        "label_path": [f"label/{c}_{v}.nii.gz" for c, v in zip(manifest["case"], manifest["vertebra"])],
        "predicted_height_mm": float(BODY_ROWS), "slices": 8,
    }), root)


VERTEBRAE = [
    ("sub-a", "train", 20, (0.0, 0.0, 0.0)),
    ("sub-a", "train", 22, (0.45, 0.2, 0.0)),
    ("sub-b", "val", 21, (0.3, 0.3, 0.3)),
    ("sub-c", "test", 20, (0.1, 0.4, 0.05)),
]


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("preprocessed")
    return root, write_crops(root, VERTEBRAE)


def test_rhlv_matches_the_known_losses_with_healthy_truth(crops: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    data, manifest = crops
    out = tmp_path / "rhlv"
    assert main(["rhlv", "--data", str(data), "--healthy-truth", "--out", str(out), "--metrics",
                 str(tmp_path / "m.json"), *NO_PARAMS]) == 0
    table = pd.read_parquet(out / "rhlv.parquet")
    assert len(table) == len(manifest)
    for third in ("ant", "mid", "post"):
        np.testing.assert_allclose(table[f"rhlv_{third}"], manifest[f"truth_loss_{third}"], atol=1e-9)
    # the neighbours are healthy, so the mask-only baseline is right, except where its own-column
    # threshold drops the severe wedge's anterior third (counted as a total loss)
    np.testing.assert_allclose(table["baseline_loss_ant"], [0.0, 1.0, 0.3125, 0.125], atol=1e-9)
    assert table["grade"].tolist() == manifest["grade"].tolist()
    assert {"rhlv_body", "shape_ratio", "h_syn_ant_mm", "h_ori_post_mm", "rhlv_cor_right", "split", "name"} <= set(table.columns)
    for name in ("sub-a_20", "sub-a_22", "sub-b_21", "sub-c_20"):
        loss_map = load_volume(out / "maps" / f"{name}.nii.gz")
        assert loss_map.shape == (1, SHAPE[1], SHAPE[2])
        assert (out / "maps" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    wedge = load_volume(out / "maps" / "sub-a_22.nii.gz").array[0]
    assert wedge.max() == pytest.approx(1 - np.rint(16 * 0.55) / 16)
    assert wedge[0, 0] == 0.0  # outside the body
    assert '"rhlv_mae": 0.0' in (tmp_path / "m.json").read_text()


def test_synthesis_folder_gives_the_same_table(crops: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    data, manifest = crops
    write_synthesis(tmp_path / "synth", manifest, data)
    metrics = rhlv_stage.run(Params(), data, tmp_path / "synth", tmp_path / "rhlv")
    assert metrics["rhlv_mae"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["rhlv_vertebrae"] == 4


def test_synthesis_with_other_geometry_is_refused(crops: tuple[Path, pd.DataFrame], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data, manifest = crops
    synth = tmp_path / "synth"
    write_synthesis(synth, manifest, data)
    moved = IPL.copy()
    moved[:3, 3] += 5.0
    save_volume(synth / "label" / "sub-b_21.nii.gz", crop_labels(21, (0, 0, 0)), moved)
    assert main(["rhlv", "--data", str(data), "--synth", str(synth), "--out", str(tmp_path / "o"), *NO_PARAMS]) == 2
    error = capsys.readouterr().err.strip()
    assert "sub-b_21.nii.gz: affine differs" in error and "\n" not in error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage, message", [
    ("drop_target", "label/sub-b_21.nii.gz: vertebra sub-b_21 (label 21) is missing from the label map"),
    ("drop_row", "vertebra sub-c_20 of the manifest was not synthesised"),
])
def test_vertebra_missing_on_one_side_is_refused(crops: tuple[Path, pd.DataFrame], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str], damage: str, message: str) -> None:
    data, manifest = crops
    synth = tmp_path / "synth"
    write_synthesis(synth, manifest, data)
    if damage == "drop_target":
        labels = crop_labels(21, (0, 0, 0))
        save_volume(synth / "label" / "sub-b_21.nii.gz", np.where(labels == 21, 0, labels).astype(np.uint8), IPL)
    else:
        index = pd.read_parquet(synth / "index.parquet")
        index[index["case"] != "sub-c"].to_parquet(synth / "index.parquet")
    assert main(["rhlv", "--data", str(data), "--synth", str(synth), "--out", str(tmp_path / "o"), *NO_PARAMS]) == 2
    assert message in capsys.readouterr().err
