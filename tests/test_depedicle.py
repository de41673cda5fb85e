"""De-pedicling: the body is cut from the arch at the spinal canal, on synthetic and real vertebrae."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from healthivert.geometry.depedicle import depedicle, posterior_wall

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "verse19-sample"


def synthetic_vertebra(label: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A whole vertebra (CC, AP, LR) at 1 mm: elliptic body, pedicles, lamina and spinous process.

    Returns the label volume and the true body mask. The body spans AP columns 10..39 (30 mm deep),
    the canal columns 40..54, the lamina 55..60 and the spinous process 61..80.
    """
    shape = (40, 90, 60)
    cc, ap, lr = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    rows = (cc >= 8) & (cc < 33)
    rounded_front = ((ap - 30.0) / 20.0) ** 2 + ((lr - 29.5) / 20.0) ** 2 <= 1.0
    flat_back = (ap >= 30) & (ap <= 39) & (np.abs(lr - 29.5) <= 18)
    body = rows & (ap <= 39) & (rounded_front | flat_back)
    pedicles = (cc >= 12) & (cc < 26) & (ap >= 35) & (ap <= 56) & (np.abs(lr - 29.5) >= 8) & (np.abs(lr - 29.5) <= 13)
    lamina = (cc >= 10) & (cc < 28) & (ap >= 55) & (ap <= 60) & (np.abs(lr - 29.5) <= 13)
    spinous = (cc >= 14) & (cc < 24) & (ap >= 55) & (ap <= 80) & (np.abs(lr - 29.5) <= 2)
    labels = np.zeros(shape, dtype=np.int32)
    labels[body | pedicles | lamina | spinous] = label
    return labels, body


def test_synthetic_body_is_recovered() -> None:
    labels, body = synthetic_vertebra()
    bodies, cuts = depedicle(labels)
    assert cuts[0].wall_column == 39
    assert not bodies[:, 40:, :].any()  # pedicles, lamina and process gone
    recovered = bodies == 20
    assert np.count_nonzero(recovered & ~body) == 0
    assert np.count_nonzero(recovered) == pytest.approx(np.count_nonzero(body), rel=0.02)
    assert cuts[0].depth_mm == pytest.approx(30.0, abs=1.0)


def test_label_without_canal_is_kept_whole_and_labels_stay_apart() -> None:
    labels, body = synthetic_vertebra()
    body_only = np.where(body, 21, 0).astype(np.int32)
    stacked = np.concatenate([labels, body_only], axis=0)
    bodies, cuts = depedicle(stacked)
    by_id = {c.vertebra: c for c in cuts}
    assert by_id[21].wall_column is None and by_id[21].kept_fraction == 1.0
    assert np.array_equal(bodies[40:] == 21, body)
    assert np.array_equal(bodies[:40] == 20, body)
    assert posterior_wall(np.zeros((5, 5, 5), dtype=bool)) is None


def test_verse_0007_bodies_are_plausible_and_match_the_reference_bodies() -> None:
    if not (DATA / "0007_msk.nii.gz").exists():
        pytest.skip("shared sample data ../shared/data/verse19-sample not present")
    from healthivert.geometry.straighten import straighten
    from healthivert.io.nifti import load_volume

    mask = load_volume(DATA / "0007_msk.nii.gz", label=True)
    entries = json.loads((DATA / "0007_ctd.json").read_text())
    centroids = {int(e["label"]): np.array([e["X"], e["Y"], e["Z"]]) for e in entries}
    straight = straighten(mask.array, mask.spacing_mm, centroids)
    bodies, cuts = depedicle(straight.labels, vertebrae=list(range(18, 25)))
    for cut in cuts:
        assert cut.wall_column is not None
        assert 25.0 <= cut.depth_mm <= 45.0, cut
        assert 0.5 <= cut.kept_fraction <= 0.75, cut
        body = bodies == cut.vertebra
        assert not body[:, cut.wall_column + 1:, :].any()
        # a body is one piece
        from scipy import ndimage

        assert ndimage.label(body)[1] == 1
        reference_file = DATA / "straightened" / "label" / f"0007_{cut.vertebra}.nii.gz"
        if reference_file.exists():  # the paper's own de-pedicled bodies of this scan
            reference = load_volume(reference_file, label=True).array == cut.vertebra
            assert np.count_nonzero(body) == pytest.approx(np.count_nonzero(reference), rel=0.1)
