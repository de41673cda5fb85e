"""Relative Height Loss of Vertebrae: synthesised healthy vs original body heights, per third."""

from healthivert.rhlv.measure import (
    ColumnMode,
    RhlvResult,
    compute_rhlv,
    compute_rhlv_coronal,
    height_loss_map,
    rhlv_with_params,
)

__all__ = ["ColumnMode", "RhlvResult", "compute_rhlv", "compute_rhlv_coronal", "height_loss_map", "rhlv_with_params"]
