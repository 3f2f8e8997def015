"""``report.html``: one self-contained file that works offline.

plotly.js is embedded inline (``plotly.offline.get_plotlyjs``), never loaded
from a CDN; MathJax is off. Tables carry the provenance, per-class AP, the
evidence for float layers and the precision map, so the page reads without JS.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from sensisearch.fileio import write_text_atomic
from sensisearch.report._data import (
    PRECISION_COLOURS,
    PRECISION_ORDER,
    ci_offsets,
    configuration_summary,
    flatten_provenance,
    negate_ci,
    precision_codes,
)
from sensisearch.report._groups import pareto_groups

if TYPE_CHECKING:
    from sensisearch.report._data import ReviewData

PARETO_DIV = "pareto-plot"
PRECISION_DIV = "precision-map"
SENSITIVITY_DIV = "sensitivity-chart"
LATENCY_DIV = "latency-distributions"

# No logo link-out to plotly.com: the page makes no requests at all.
_PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.pm td { width: 10px; height: 14px; padding: 0; border: 1px solid #fff; }
.pm th { font-weight: normal; white-space: nowrap; }
.note { color: #555; font-size: 0.9em; }
.bad { color: #b00020; } .good { color: #1b7f3b; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _ci_text(ci: tuple[float, float] | None, digits: int = 2) -> str:
    return "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _figure_div(fig: go.Figure, div_id: str) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=div_id, config=_PLOT_CONFIG)


def _pareto_figure(data: ReviewData) -> go.Figure:
    fig = go.Figure()
    front = data.front()
    if len(front) > 1:
        # A line, not markers: the DOM holds exactly one marker per trial.
        fig.add_trace(go.Scatter(
            x=[data.x_of(p) for p in front], y=[p.metric_change for p in front], mode="lines",
            line={"color": "#264653", "width": 1, "dash": "dot"}, name="front", hoverinfo="skip",
        ))
    for group in pareto_groups(data):
        pts = group.points
        x = [data.x_of(p) for p in pts]
        y = [p.metric_change for p in pts]
        x_minus, x_plus = ci_offsets(x, [None if data.cost_axis else p.speedup_ci95 for p in pts])
        y_minus, y_plus = ci_offsets(y, [negate_ci(p.drop_ci95) for p in pts])
        hover = [
            "<br>".join(
                [
                    f"<b>{_e(p.name)}</b>" + ("" if p.feasible else " (infeasible)"),
                    f"{_e(data.metric_name)} {p.metric:.3f} ({p.metric_change:+.3f}{_e(_ci_text(negate_ci(p.drop_ci95), 3))})",
                    _e(p.speed_text()) if p.relative_cost is not None else f"speed-up {_e(p.speed_text(3, 3))}",
                    *(_e(line) for line in configuration_summary(p).splitlines()),
                ]
            )
            for p in pts
        ]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers+text" if group.annotate else "markers", name=f"{group.name} ({len(pts)})",
            text=[p.name for p in pts] if group.annotate else None, textposition="top right",
            marker={"symbol": group.plotly_symbol, "size": group.size, "color": group.colour, "line": {"width": 0.5, "color": "#333"}},
            error_x={"type": "data", "symmetric": False, "array": x_plus.tolist(), "arrayminus": x_minus.tolist(), "thickness": 0.8, "width": 2},
            error_y={"type": "data", "symmetric": False, "array": y_plus.tolist(), "arrayminus": y_minus.tolist(), "thickness": 0.8, "width": 2},
            hovertext=hover, hoverinfo="text", customdata=[p.trial for p in pts],
        ))
    fig.add_hline(y=0, line={"color": "grey", "width": 0.6, "dash": "dash"})
    fig.add_vline(x=1, line={"color": "grey", "width": 0.6, "dash": "dash"})
    fig.update_layout(
        title=("Estimated relative cost (FP32 = 1, not a speed-up) against metric change (hover a point for its configuration)"
               if data.cost_axis else "Speed-up against metric change, both with 95 % CIs (hover a point for its configuration)"),
        xaxis_title=data.speed_axis, yaxis_title=f"{data.metric_name} change vs FP32 (points)",
        template="plotly_white", height=560, hoverlabel={"align": "left"},
    )
    return fig


def _precision_figure(data: ReviewData) -> go.Figure:
    rows = data.front()
    codes = precision_codes(data.layers, rows).astype(float)
    codes[codes < 0] = float("nan")
    n = len(PRECISION_ORDER)
    # Discrete colour scale: each code owns an equal band of [0, 1].
    scale = []
    for i, p in enumerate(PRECISION_ORDER):
        scale += [[i / n, PRECISION_COLOURS[p]], [(i + 1) / n, PRECISION_COLOURS[p]]]
    labels = [[PRECISION_ORDER[int(c)].upper() if c == c else "-" for c in row] for row in codes]
    fig = go.Figure(go.Heatmap(
        z=codes, x=list(data.layers), y=[p.name for p in rows], zmin=-0.5, zmax=n - 0.5, colorscale=scale,
        customdata=labels, hovertemplate="%{y}<br>%{x}: %{customdata}<extra></extra>", xgap=1, ygap=1,
        colorbar={"tickvals": list(range(n)), "ticktext": [p.upper() for p in PRECISION_ORDER], "title": "precision"},
    ))
    fig.update_layout(
        title="Precision per layer (graph order) of each front point, fastest first",
        template="plotly_white", height=200 + 28 * len(rows), xaxis={"tickangle": -90, "tickfont": {"size": 8}},
        yaxis={"autorange": "reversed"},
    )
    return fig


def _sensitivity_figure(data: ReviewData) -> go.Figure:
    rows = data.sensitivity
    fig = go.Figure()
    fig.add_trace(go.Bar(
        x=[r.layer for r in rows], y=[r.drop_only_this_int8 for r in rows], name="drop with only this layer INT8",
        marker_color=PRECISION_COLOURS["int8"],
    ))
    fig.add_trace(go.Bar(
        x=[r.layer for r in rows], y=[r.drop_all_but_this_int8 for r in rows], name="drop with all but this layer INT8",
        marker_color=PRECISION_COLOURS["fp32"],
    ))
    fig.update_layout(
        barmode="group", title=f"Layer sensitivity ({_e(data.metric_name)} points below FP32)", template="plotly_white",
        height=460, xaxis={"tickangle": -90, "tickfont": {"size": 8}}, yaxis_title="drop (points)",
    )
    return fig


def _latency_figure(data: ReviewData) -> go.Figure:
    fig = go.Figure()
    shown = [p for p in data.points if p.latencies_ms and (p.kind.value != "searched" or p.on_front or p.is_winner)]
    for p in shown:
        fig.add_trace(go.Box(x=list(p.latencies_ms), name=p.name, boxpoints=False, orientation="h"))
    fig.update_layout(
        title="Latency per timing round (ms): baselines, references and the front", template="plotly_white",
        height=160 + 26 * len(shown), xaxis_title="latency (ms)", showlegend=False,
    )
    return fig


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{cell}</td>' if j in numeric else f"<td>{cell}</td>" for j, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _precision_table(data: ReviewData) -> str:
    rows = data.front()
    header = "<tr><th>trial</th>" + "".join(f'<th title="{_e(layer)}">{j}</th>' for j, layer in enumerate(data.layers)) + "</tr>"
    body = []
    for p in rows:
        cells = []
        for layer in data.layers:
            prec = p.precisions.get(layer)
            colour = PRECISION_COLOURS.get(prec or "", "#dddddd")
            cells.append(f'<td style="background:{colour}" title="{_e(layer)}: {_e((prec or "-").upper())}"></td>')
        body.append(f"<tr><th>{_e(p.name)}</th>{''.join(cells)}</tr>")
    legend = " ".join(f'<span style="background:{PRECISION_COLOURS[p]};padding:0 6px">{p.upper()}</span>' for p in PRECISION_ORDER)
    names = "; ".join(f"{j}: {_e(layer)}" for j, layer in enumerate(data.layers))
    return (
        f'<div class="scroll"><table class="pm">{header}{"".join(body)}</table></div>'
        f'<p class="note">{legend} &mdash; columns in graph order: {names}</p>'
    )


def _front_table(data: ReviewData) -> str:
    rows = []
    for p in sorted(data.points, key=lambda q: (not q.is_winner, not q.on_front, q.kind.value, -q.speedup)):
        counts = {k: sum(1 for v in p.precisions.values() if v == k) for k in PRECISION_ORDER}
        rows.append([
            _e(p.name) + (" <b>winner</b>" if p.is_winner else ""),
            _e(p.kind.value) + ("" if p.feasible else " (infeasible)"),
            "yes" if p.on_front else "",
            f"{p.metric:.3f}",
            f"{p.metric_change:+.3f}{_e(_ci_text(negate_ci(p.drop_ci95)))}",
            _e(p.speed_text()),
            "/".join(str(counts[k]) for k in PRECISION_ORDER),
            _e(p.calibration),
        ])
        if data.holdout_images:
            rows[-1].insert(5, _holdout_change(p))
    header = ["trial", "kind", "front", data.metric_name, "change vs FP32 [95% CI]", f"{data.speed_axis} [95% CI]",
              "INT8/FP16/FP32", "calibration"]
    if data.holdout_images:
        header.insert(5, f"held-out change [95% CI] ({data.holdout_images} images)")
    return _table(header, rows, numeric={3, 4, 5, 6} if data.holdout_images else {3, 4, 5})


def _holdout_change(p: ReviewPoint) -> str:
    """The change vs FP32 on the held-out images (``-``: not scored there)."""
    if p.holdout_change is None:
        return "-"
    return f"{p.holdout_change:+.3f}{_e(_ci_text(negate_ci(p.holdout_drop_ci95)))}"


def _classes_table(data: ReviewData) -> str:
    rows = []
    for r in sorted(data.winner_classes, key=lambda r: r.change):
        css = "bad" if r.change < 0 else "good"
        rows.append([_e(r.name), str(r.instances), f"{r.fp32_ap:.2f}", f"{r.winner_ap:.2f}", f'<span class="{css}">{r.change:+.2f}</span>'])
    return _table(["class", "instances", "FP32 AP", "winner AP", "change"], rows, numeric={1, 2, 3, 4})


def _sensitivity_table(data: ReviewData) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    rows = [[_e(r.layer), f(r.drop_only_this_int8), f(r.drop_all_but_this_int8)] for r in data.sensitivity]
    header = ["layer (graph order)", "drop, only this INT8", "drop, all but this INT8"]
    if any(r.speed_all_but_this_int8 is not None for r in data.sensitivity):
        # Where the probes were timed: how fast the model is with only this layer in float, against all-INT8.
        header.append("all but this INT8: speed vs all-INT8 [95% CI]")
        for row, r in zip(rows, data.sensitivity):
            row.append("n/a" if r.speed_all_but_this_int8 is None else "{:.2f}x [{:.2f}, {:.2f}]".format(*r.speed_all_but_this_int8))
    return _table(header, rows, numeric=set(range(1, len(header))))


def render_report_html(data: ReviewData) -> str:
    """The whole page as one string (pure: no file system)."""
    winner = data.winner
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(data.title)}</title>",
        f"<style>{_CSS}</style>",
        # plotly.js inline: the report must open with no network.
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{_e(data.title)}</h1>",
    ]
    if winner is not None:
        parts.append(
            f"<p><b>Winner {_e(winner.name)}</b>: {_e(data.metric_name)} {winner.metric:.3f} "
            f"({winner.metric_change:+.3f}{_e(_ci_text(negate_ci(winner.drop_ci95)))} vs FP32), "
            f"{_e(winner.speed_text())} {_e(data.speed_axis)}; {_e(winner.calibration)}.</p>"
        )
        if winner.holdout_drop is not None:
            parts.append(f"<p>On the {data.holdout_images} held-out images the search never saw: change vs FP32 "
                         f"{_holdout_change(winner)}.</p>")
    else:
        parts.append("<p><b>No winner</b>: no trial met the accuracy and speed criteria.</p>")
    if data.noise:
        parts.append(f'<p class="note">{_e(data.noise)}</p>')
    parts += [f"<p>{_e(v.replace('**', ''))}</p>" for v in data.verdicts]
    parts += [f'<p class="note">{_e(v)}</p>' for v in data.accuracy_notes]
    if data.prediction_summary:
        estimate = data.prediction_source == "estimate"  # an estimate is a relative cost, never a speed-up
        rows = [[str(n), f"{1.0 / a:.2f}" if estimate else f"{a:.2f}x", f"{b:.2f}x"] for n, a, b in data.prediction_rows]
        parts += ["<h2>Predicted vs measured speed-up</h2>", f"<p>{_e(data.prediction_summary)}</p>",
                  _table(["trial", "in-study estimated cost (FP32 = 1)" if estimate else "in-study speed-up", "verified speed-up"],
                         rows, numeric={1, 2})]

    parts += ["<h2>Pareto front</h2>", _figure_div(_pareto_figure(data), PARETO_DIV), _front_table(data)]
    parts += ["<h2>Precision map of the front</h2>"]
    if data.front():
        parts += [_figure_div(_precision_figure(data), PRECISION_DIV), _precision_table(data)]
    else:
        parts.append("<p>No point is on the front.</p>")

    parts.append("<h2>Why the winner keeps these layers in FP16/FP32</h2>")
    if data.float_layer_evidence:
        rows = [[_e(r.layer), _e(r.precision.upper()), _e(r.evidence)] for r in data.float_layer_evidence]
        parts.append(_table(["layer", "precision", "evidence"], rows))
    elif winner is not None and any(v != "int8" for v in winner.precisions.values()):
        parts.append('<p class="bad">The winner keeps layers in FP16/FP32, but no evidence was recorded for them.</p>')
    else:
        parts.append("<p>The winner runs every layer in INT8.</p>" if winner is not None else "<p>No winner.</p>")

    if data.sensitivity:
        parts += ["<h2>Layer sensitivity</h2>", _figure_div(_sensitivity_figure(data), SENSITIVITY_DIV), _sensitivity_table(data)]
    if data.winner_classes:
        parts += ["<h2>Per-class AP: winner against FP32 (worst first)</h2>", _classes_table(data)]
    if any(p.latencies_ms for p in data.points):
        parts += ["<h2>Latency distributions</h2>", _figure_div(_latency_figure(data), LATENCY_DIV)]
    parts.append("<h2>Data provenance</h2>")
    parts.append(_table(["what", "value"], [[_e(k), _e(v)] for k, v in flatten_provenance(data.provenance)]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report_html(data: ReviewData, path: str | Path) -> Path:
    """Write :func:`render_report_html` atomically to ``path``."""
    return write_text_atomic(path, render_report_html(data))
