"""The RHLV error floor of restoring a vertebra from its neighbours, from the phantom's truth.

A pseudo-healthy vertebra is synthesised from its neighbours: what the vertebra itself looked like
before it broke is not in the input. On phantom data every vertebra's fracture-free third heights are
known, so the best a neighbour-based restoration could do is computable: take the mean of the two
neighbours' *true* fracture-free heights of each third as ``H_syn`` (no synthesis error, no fractured
neighbour, no measuring error) and score its RHLV against the truth as the pipeline's is scored. What
is left is the vertebra's own variation (height jitter, tilt, endplate cup) that its neighbours do
not share: a floor for the method on this data, not for one implementation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

THIRDS = ("ant", "mid", "post")
#: manifest columns the floor needs (present for phantom data only).
TRUTH_COLUMNS = (*(f"truth_h_{t}_mm" for t in THIRDS), *(f"truth_healthy_h_{t}_mm" for t in THIRDS),
                 *(f"truth_loss_{t}" for t in THIRDS))


def neighbour_oracle_rhlv(table: pd.DataFrame) -> pd.DataFrame:
    """RHLV of each vertebra restored as the mean of its two neighbours' true fracture-free heights.

    Args:
        table: one row per vertebra with ``case, vertebra, above, below`` (the neighbours' ids, NA at
            an end) and the truth columns :data:`TRUTH_COLUMNS`.

    Returns:
        ``case, vertebra, oracle_<third>`` for every vertebra with truth whose two neighbours both
        have truth (an empty frame when none has, e.g. for scans without a phantom truth).
    """
    columns = ["case", "vertebra", *(f"oracle_{t}" for t in THIRDS)]
    if any(column not in table.columns for column in (*TRUTH_COLUMNS, "above", "below")):
        return pd.DataFrame(columns=columns)
    truth = table.dropna(subset=list(TRUTH_COLUMNS)).copy()
    truth["vertebra"] = truth["vertebra"].astype(int)
    healthy = truth.set_index(["case", "vertebra"])[[f"truth_healthy_h_{t}_mm" for t in THIRDS]]
    rows = truth.dropna(subset=["above", "below"])
    above = pd.MultiIndex.from_arrays([rows["case"], rows["above"].astype(int)])
    below = pd.MultiIndex.from_arrays([rows["case"], rows["below"].astype(int)])
    both = above.isin(healthy.index) & below.isin(healthy.index)
    rows, above, below = rows[both], above[both], below[both]
    out = rows[["case", "vertebra"]].reset_index(drop=True)
    for third in THIRDS:
        column = f"truth_healthy_h_{third}_mm"
        restored = (healthy.loc[above, column].to_numpy() + healthy.loc[below, column].to_numpy()) / 2.0
        out[f"oracle_{third}"] = (restored - rows[f"truth_h_{third}_mm"].to_numpy()) / restored
    return out[columns]


def rhlv_floor_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``rhlv.floor.*``: the neighbour oracle's RHLV MAE and the GAN's on the same vertebrae.

    Args:
        table: the manifest joined with the RHLV table (``rhlv_<third>`` and the truth columns).

    Returns:
        ``rhlv.floor.mae.<third>`` (the oracle), ``rhlv.floor.gan_mae.<third>`` and ``rhlv.floor.n``;
        empty when no vertebra has two neighbours with truth.
    """
    oracle = neighbour_oracle_rhlv(table)
    if oracle.empty:
        return {}
    rows = oracle.merge(table.assign(vertebra=table["vertebra"].astype(int)), on=["case", "vertebra"])
    metrics: dict[str, float] = {}
    for third in THIRDS:
        truth = rows[f"truth_loss_{third}"].to_numpy(dtype=float)
        metrics[f"rhlv.floor.mae.{third}"] = float(np.mean(np.abs(rows[f"oracle_{third}"].to_numpy(dtype=float) - truth)))
        metrics[f"rhlv.floor.gan_mae.{third}"] = float(np.nanmean(np.abs(rows[f"rhlv_{third}"].to_numpy(dtype=float) - truth)))
    return metrics | {"rhlv.floor.n": float(len(rows))}
