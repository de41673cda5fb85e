"""What ``grade`` writes per case: ``grades.csv`` / ``grades.json``, pseudo-healthy volumes in the scan's
own space, height-loss maps and a self-contained ``report.html`` (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from healthivert.data.manifest import crop_name
from healthivert.evaluation.figures import figure_png
from healthivert.evaluation.report import DISCLAIMER, GRADE_WORDS, STYLE
from healthivert.geometry.crops import crop_affine
from healthivert.inference.bundle import GraderBundle
from healthivert.inference.grade import TABLE_COLUMNS, CaseGrades, GradedVertebra, to_stored_orientation
from healthivert.inference.panels import loss_colour_bar, png_bytes, vertebra_strip
from healthivert.io.atomic import atomic_dir
from healthivert.io.nifti import save_volume
from healthivert.rhlv.figures import LOSS_RANGE
from healthivert.rhlv.vertebra import loss_map_volume

NOT_MEASURED = "not measured"
#: overview colours: grade 0..3 (normal to severe), then "not graded".
GRADE_COLOURS = ("#4daf4a", "#ffd92f", "#ff7f00", "#e41a1c", "#999999")


def _json_value(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def grades_table(result: CaseGrades, bundle: GraderBundle) -> pd.DataFrame:
    """``grades.csv`` of a case: one row per vertebra, cranial first."""
    scores = [f"score_grade_{g}" for g in bundle.svm.classes]
    table = pd.DataFrame(result.table_rows()).reindex(columns=[*TABLE_COLUMNS[:6], *scores, *TABLE_COLUMNS[6:]])
    table["grade"] = table["grade"].astype("Int64")
    table["baseline_grade"] = table["baseline_grade"].astype("Int64")
    return table


def _overview(result: CaseGrades) -> Figure:
    """Mid-sagittal slice of the straightened spine, each body coloured by its grade."""
    crops = result.crops
    ct = crops.ct_hu
    middle = ct.shape[2] // 2 if crops.window[1].stop is None else (crops.window[1].start + crops.window[1].stop) // 2
    colour_of = np.full(int(crops.spine.bodies.max()) + 1, -1, dtype=np.int64)
    for vertebra in result.vertebrae:
        vid = int(vertebra.values["vertebra"])
        if vid < len(colour_of):
            grade = vertebra.values.get("grade")
            colour_of[vid] = int(grade) if vertebra.values["graded"] and grade is not None else 4
    slab = crops.spine.bodies[:, :, max(middle - 3, 0):middle + 4]
    labels = np.where(slab.any(axis=2), slab.max(axis=2), 0)
    overlay = np.ma.masked_less(colour_of[labels], 0)
    rows = np.flatnonzero(labels.any(axis=1))
    figure = Figure(figsize=(4.5, 8), dpi=90)
    axes = figure.add_axes((0.02, 0.02, 0.96, 0.9))  # fixed layout: tight_layout costs more than the drawing
    r0, r1 = (max(rows[0] - 20, 0), rows[-1] + 20) if rows.size else (0, ct.shape[0])
    axes.imshow(ct[r0:r1, :, middle], cmap="gray", vmin=-300, vmax=1200)
    axes.imshow(overlay[r0:r1], cmap=ListedColormap(GRADE_COLOURS), vmin=-0.5, vmax=4.5, alpha=0.45,
                interpolation="nearest")
    for vertebra in result.vertebrae:
        vid = int(vertebra.values["vertebra"])
        found = np.argwhere(labels[r0:r1] == vid)
        if found.size:
            y, x = found.mean(axis=0)
            axes.text(x, y, str(vertebra.values["name"]), fontsize=8, color="white", ha="center", va="center")
    axes.set_axis_off()
    axes.set_title("straightened spine, mid-sagittal: green normal, yellow mild, orange moderate, red severe, grey not graded",
                   fontsize=7, wrap=True)
    return figure


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value is pd.NA:
        return NOT_MEASURED
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _panel(vertebra: GradedVertebra) -> str | None:
    """The report's section of a vertebra: title, its three pictures (see :func:`vertebra_strip`), caption."""
    crop, synthesis, loss = vertebra.crop, vertebra.synthesis, vertebra.loss_map
    if crop is None or synthesis is None or loss is None or crop.ct is None:
        return None
    vid = crop.vertebra
    middle = int(np.median(np.flatnonzero((crop.labels == vid).any(axis=(0, 1)))))
    strip = vertebra_strip(crop.ct[:, :, middle], synthesis.ct[:, :, middle], crop.labels[:, :, middle] == vid,
                           synthesis.label[:, :, middle] == vid, loss)
    name = html.escape(str(vertebra.values["name"]))
    grade = vertebra.values.get("grade")
    words = GRADE_WORDS.get(grade, NOT_MEASURED) if vertebra.values["graded"] else "not graded"
    return (f'<div class="vertebra"><h3>{name}: grade {_cell(grade)} ({html.escape(words)})</h3>'
            f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png_bytes(strip)).decode()}">'
            f"<p>Mid-sagittal slice (cranial up, anterior left): original (orange outline), pseudo-healthy "
            f"(green outline); then the axial height-loss map (anterior up, patient's right on the left).</p></div>")


def report_html(result: CaseGrades, table: pd.DataFrame, bundle: GraderBundle) -> str:
    """The case's self-contained report."""
    case_id = str(table["case"].iloc[0]) if len(table) else result.case.case_id
    training = bundle.manifest.get("training_data", {})
    columns = ["name", "grade", "flag", "rhlv_ant", "rhlv_mid", "rhlv_post", "h_ori_body_mm", "h_syn_body_mm",
               "baseline_loss_max", "baseline_grade"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row[c])}</td>" for c in columns) + "</tr>"
                   for _, row in table.iterrows())
    overview = base64.b64encode(figure_png(_overview(result))).decode()
    panels = [panel for panel in map(_panel, result.vertebrae) if panel is not None]
    scale = base64.b64encode(loss_colour_bar()).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>HealthiVert grades: {html.escape(case_id)}</title>
<style>{STYLE}</style></head><body>
<h1>HealthiVert grades: {html.escape(case_id)}</h1>
<p class="disclaimer">{DISCLAIMER}</p>
<p>Model trained on: {html.escape(json.dumps(training, sort_keys=True))}. Grades of scans unlike its training data
mean nothing clinically. Genant grades: 0 normal, 1 mild (20-25 % height loss), 2 moderate (25-40 %), 3 severe (&gt; 40 %).
"{NOT_MEASURED}" marks a value that was not measured (not a loss of 0).</p>
<img alt="overview" src="data:image/png;base64,{overview}">
<table><tr>{head}</tr>{body}</table>
<p>Height loss (H_syn - H_ori) / H_syn: {LOSS_RANGE[0]:.0%}
<img alt="height-loss colour scale" src="data:image/png;base64,{scale}"> {LOSS_RANGE[1]:.0%} and more;
grey: not measured.</p>
{''.join(panels)}
</body></html>
"""


def write_case(result: CaseGrades, bundle: GraderBundle, out: Path) -> pd.DataFrame:
    """Write everything of one graded case into ``out`` (replaced whole, never half-written); returns the table."""
    table = grades_table(result, bundle)
    with atomic_dir(out) as tmp:
        table.to_csv(tmp / "grades.csv", index=False, na_rep=NOT_MEASURED)
        document = {
            "case": result.case.case_id,
            "intended_use": DISCLAIMER,
            "model": {key: bundle.manifest.get(key) for key in ("schema", "training_data", "versions", "views")},
            "vertebrae": [{key: _json_value(value) for key, value in row.items() if value is not pd.NA}
                          for row in table.to_dict(orient="records")],
        }
        (tmp / "grades.json").write_text(json.dumps(document, indent=2) + "\n")
        save_volume(tmp / "pseudo_healthy_ct.nii.gz", to_stored_orientation(result.pseudo_healthy_ct, result.case))
        save_volume(tmp / "pseudo_healthy_label.nii.gz",
                    to_stored_orientation(result.pseudo_healthy_label, result.case))
        base = result.crops.spine.map.affine()
        for vertebra in result.vertebrae:
            if vertebra.loss_map is None or vertebra.crop is None or vertebra.synthesis is None:
                continue
            syn = vertebra.synthesis.label == vertebra.crop.vertebra
            volume = loss_map_volume(vertebra.loss_map, crop_affine(base, vertebra.crop.origin), syn)
            save_volume(tmp / "loss_maps" / f"{crop_name(result.case.case_id, vertebra.crop.vertebra)}.nii.gz", volume)
        (tmp / "report.html").write_text(report_html(result, table, bundle))
    return table
