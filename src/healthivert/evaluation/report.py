"""The self-contained HTML report (figures embedded as base64 PNG): what a clinician reads."""

from __future__ import annotations

import base64
import dataclasses
import html
import math

from healthivert.grading.metrics import GRADES

GRADE_WORDS = {0: "normal", 1: "mild", 2: "moderate", 3: "severe"}
DISCLAIMER = "Research use, not for diagnosis."

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.1em; } .disclaimer { color: #b00; font-weight: bold; }
table { border-collapse: collapse; margin: 0.8em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.vertebra { border-top: 1px solid #ddd; padding-top: 0.6em; margin-top: 1em; }
.wrong { color: #b00; font-weight: bold; } img { max-width: 100%; }
"""


@dataclasses.dataclass(frozen=True)
class VertebraEntry:
    """One vertebra's section of the report.

    Attributes:
        title: e.g. ``"sub-phantom003 L1 (test)"``.
        true_grade: Genant grade from the annotations, ``None`` if unknown.
        predicted: grade predicted from RHLV.
        predicted_baseline: grade predicted from the mask-only baseline, ``None`` if not available.
        rhlv: ``(ant, mid, post, body)`` RHLV.
        panel_png: original vs pseudo-healthy slices and the height-loss map.
    """

    title: str
    true_grade: int | None
    predicted: int
    predicted_baseline: int | None
    rhlv: tuple[float, float, float, float]
    panel_png: bytes


@dataclasses.dataclass(frozen=True)
class ReportContent:
    """Everything the report shows.

    Attributes:
        summary: ``(label, value)`` lines of the headline table.
        comparison: one or two sentences on GAN vs baseline.
        grading_rows: ``(method, macro-P, macro-R, macro-F1, per-grade recall)`` formatted strings.
        generation_rows: ``(label, value)`` lines of generation quality.
        figures: caption -> PNG bytes (confusion matrices, scatter plots).
        vertebrae: per-vertebra sections.
    """

    summary: list[tuple[str, str]]
    comparison: str
    grading_rows: list[tuple[str, ...]]
    generation_rows: list[tuple[str, str]]
    figures: dict[str, bytes]
    vertebrae: list[VertebraEntry]


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _grade(grade: int | None) -> str:
    return "unknown" if grade is None else f"{grade} ({GRADE_WORDS[grade]})"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f} %"


def _pairs_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td class='num'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _vertebra_section(entry: VertebraEntry) -> str:
    wrong = entry.true_grade is not None and entry.predicted != entry.true_grade
    rhlv = " / ".join(_percent(v) for v in entry.rhlv[:3])
    baseline = "" if entry.predicted_baseline is None else f"; mask-only baseline: {_grade(entry.predicted_baseline)}"
    return (
        f"<div class='vertebra'><h3>{html.escape(entry.title)}</h3>"
        f"<p>Relative height loss (anterior / middle / posterior): <b>{rhlv}</b>, whole body {_percent(entry.rhlv[3])}. "
        f"Predicted Genant grade: <span class='{'wrong' if wrong else ''}'>{_grade(entry.predicted)}</span>; "
        f"annotated: {_grade(entry.true_grade)}{html.escape(baseline)}.</p>"
        f"{_image(entry.panel_png, entry.title)}</div>"
    )


def render_report(content: ReportContent, title: str = "HealthiVert-GAN fracture grading report") -> str:
    """The report as one self-contained HTML page."""
    grading_head = ("<tr><th>method</th><th>macro precision</th><th>macro recall</th><th>macro F1</th>"
                    "<th>recall per grade 0/1/2/3</th></tr>")
    grading_body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                           for row in content.grading_rows)
    figures = "".join(f"<figure>{_image(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                      for caption, png in content.figures.items())
    vertebrae = "".join(_vertebra_section(entry) for entry in content.vertebrae)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="disclaimer">{DISCLAIMER}</p>
<p>Each vertebra's healthy shape was synthesised from its neighbours (a pseudo-healthy vertebra); the
relative height loss (RHLV) compares it with the real vertebra in the anterior, middle and posterior
thirds, and a linear SVM turns these losses into a Genant grade (0 normal, 1 mild 20-25 %, 2 moderate
25-40 %, 3 severe &gt; 40 % height loss).</p>
<h2>Summary</h2>
{_pairs_table(content.summary)}
<p>{html.escape(content.comparison)}</p>
<h2>Grading quality</h2>
<table>{grading_head}{grading_body}</table>
<h2>Pseudo-healthy synthesis quality</h2>
<p>Healthy vertebrae (grade 0) are compared with their healthy reference (the phantom's fracture-free
truth, else the vertebra itself); fractured ones with their healthy truth where it exists.</p>
{_pairs_table(content.generation_rows)}
{figures}
<h2>Vertebrae</h2>
<p>Left: the original mid-sagittal slice (orange outline); middle: the synthesised pseudo-healthy
slice (green outline); right: the height lost in each column seen from above (anterior at the top).</p>
{vertebrae}
<p class="disclaimer">{DISCLAIMER}</p>
</body></html>
"""


def grade_recall_text(metrics: dict[str, float], prefix: str) -> str:
    """``"0.95 / 0.80 / 1.00 / n/a"``: recall per grade from flat metrics ``<prefix>recall_grade<g>``."""
    values = [metrics.get(f"{prefix}recall_grade{g}", float("nan")) for g in GRADES]
    return " / ".join("n/a" if math.isnan(v) else f"{v:.2f}" for v in values)
