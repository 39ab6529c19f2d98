"""The campaign report as one self-contained HTML page: inline SVG charts, inline CSS, no script.

A marketer opens it from an e-mail attachment or a bucket, offline: nothing is
fetched, nothing runs. Every chart is drawn here from the report tables
(models/campaign.py) and the bandit state, so the page shows exactly what the
warehouse holds. Pure functions of frames to text; nothing here imports Beam.
"""
from __future__ import annotations

import html
from typing import List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from models.campaign import (ALL, AOV_GROUPS, OVERALL_SCOPE, PATHS, STAGES, complete_windows,
                             overall_rows)

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
           "#db2777")
MUTED = "#94a3b8"
INK = "#1e293b"
DENSITY_ARMS = 8        # curves in the posterior plot; more are unreadable
SMALL_MULTIPLES = 24    # panels in the CTR-over-time grid
AOV_LABELS = {"recipients": "Recipients, attributed",
              "recipients_outside_window": "Recipients, other orders",
              "non_recipients": "Non-recipients"}

CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1e293b;
margin:0;background:#f8fafc}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 4px}
.sub{color:#64748b;margin:0 0 16px;font-size:14px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px}
.card .v{font-size:22px;font-weight:600}.card .l{color:#64748b;font-size:12px;
text-transform:uppercase;letter-spacing:.04em}.card .n{color:#475569;font-size:13px}
.panel{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:16px;margin-top:8px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:4px 8px;text-align:right;border-bottom:1px solid #f1f5f9}
th:first-child,td:first-child,th.t,td.t{text-align:left}th{color:#64748b;font-weight:600}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;color:#fff}
.published{background:#16a34a}.gated{background:#dc2626}
.grid{display:flex;flex-wrap:wrap;gap:8px}
.note{color:#64748b;font-size:13px}svg text{font-family:inherit}
"""


# --- formatting ---------------------------------------------------------------------------

def fmt_count(n: float) -> str:
    """Thousands-separated whole number.

    >>> fmt_count(34057.0)
    '34,057'
    """
    return f"{int(round(n)):,}"


def fmt_pct(x: float) -> str:
    """A rate as a percentage, with two decimals below 1% so small rates stay readable.

    >>> fmt_pct(0.741), fmt_pct(0.0093), fmt_pct(0.0)
    ('74.1%', '0.93%', '0%')
    """
    if not np.isfinite(x):
        return "–"
    if x == 0:
        return "0%"
    return f"{x:.2%}" if abs(x) < 0.01 else f"{x:.1%}"


def fmt_money(x: float) -> str:
    """Whole dollars.

    >>> fmt_money(73297.4)
    '$73,297'
    """
    return f"${x:,.0f}" if np.isfinite(x) else "–"


def fmt_hours(h: float) -> str:
    """Hours under two days, days above.

    >>> fmt_hours(5.0), fmt_hours(72.0)
    ('5.0 h', '3.0 d')
    """
    if not np.isfinite(h):
        return "–"
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


# --- SVG primitives ---------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About `n` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) within [lo, hi].

    >>> nice_ticks(0.0046, 0.69).tolist()
    [0.2, 0.4, 0.6]
    """
    raw = (hi - lo) / max(n, 1)
    if raw <= 0:
        return np.array([lo])
    power = 10.0 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    ticks = np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step)
    return np.round(ticks, 12)


def _svg(width: int, height: int, body: Sequence[str], title: str) -> str:
    """An inline SVG element with an accessible title."""
    return (f'<svg role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f"<title>{_e(title)}</title>{''.join(body)}</svg>")


def _text(x: float, y: float, text: object, size: int = 12, anchor: str = "start",
          color: str = INK, weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'fill="{color}" font-weight="{weight}">{_e(text)}</text>')


def _polyline(xs: np.ndarray, ys: np.ndarray) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))


def hbar_chart(rows: Sequence[Tuple[str, float, str]], title: str, color: str = PALETTE[0],
               width: int = 760) -> str:
    """Horizontal bars: (label, value, annotation) per row, bars scaled to the largest value.

    A non-zero value always gets a visible sliver, so a 0.5% stage still shows.
    """
    label_w, note_w, row_h = 200, 260, 30
    bar_w = width - label_w - note_w
    top = max((v for _, v, _ in rows), default=0.0) or 1.0
    body = []
    for i, (label, value, note) in enumerate(rows):
        y = 8 + i * row_h
        w = 0.0 if value <= 0 else max(bar_w * value / top, 2.0)
        body.append(_text(label_w - 8, y + 15, label, anchor="end"))
        body.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" '
                    f'rx="3" fill="{color}"/>')
        body.append(_text(label_w + w + 6, y + 15, note, size=12, color="#475569"))
    return _svg(width, 16 + row_h * len(rows), body, title)


# --- sections ---------------------------------------------------------------------------------

def _cards(funnel: pd.DataFrame, revenue: pd.DataFrame, aov: pd.DataFrame) -> str:
    total = funnel.loc[(funnel["campaign_id"] == ALL) & (funnel["treatment_id"] == ALL)]
    by_stage = total.set_index("stage")
    cards = []
    for stage in STAGES:
        n = by_stage["recipients"].get(stage, 0)
        rate = by_stage["rate_of_sent"].get(stage, np.nan)
        note = "recipients" if stage == "sent" else f"{fmt_pct(rate)} of sent"
        cards.append((stage.capitalize(), fmt_count(n), note))
    overall = revenue.loc[revenue["campaign_id"] == ALL]
    cards.append(("Attributed revenue", fmt_money(overall["revenue"].sum()),
                  f"{fmt_count(overall['orders'].sum())} orders"))
    groups = aov.set_index("group")["aov"] if len(aov) else pd.Series(dtype=float)
    cards.append(("AOV recipients", fmt_money(groups.get("recipients", np.nan)),
                  f"vs {fmt_money(groups.get('non_recipients', np.nan))} non-recipients"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="l">{_e(label)}</div><div class="v">{_e(value)}</div>'
        f'<div class="n">{_e(note)}</div></div>' for label, value, note in cards) + "</div>"


def funnel_chart(funnel: pd.DataFrame) -> str:
    """The total funnel as bars, each with its share of sent and its step conversion."""
    total = funnel.loc[(funnel["campaign_id"] == ALL) & (funnel["treatment_id"] == ALL)]
    total = total.sort_values("stage_order")
    rows = []
    for r in total.itertuples(index=False):
        note = fmt_count(r.recipients)
        if r.stage != STAGES[0]:
            note += f" · {fmt_pct(r.rate_of_sent)} of sent"
        if r.stage in STAGES[2:4]:  # steps past delivery; an order needs no click
            note += f" · {fmt_pct(r.rate_of_previous)} of {STAGES[r.stage_order - 2]}"
        rows.append((r.stage.capitalize(), float(r.recipients), note))
    return hbar_chart(rows, "Campaign funnel: sent, delivered, opened, clicked, ordered")


def _treatment_table(funnel: pd.DataFrame) -> str:
    rows = funnel.loc[(funnel["campaign_id"] != ALL) & (funnel["treatment_id"] != ALL)]
    if not len(rows):
        return ""
    wide = rows.pivot_table(index=["campaign_id", "treatment_id"], columns="stage",
                            values="recipients", aggfunc="sum").reindex(columns=list(STAGES))
    wide = wide.fillna(0).sort_values("sent", ascending=False)
    head = "".join(f"<th>{_e(s)}</th>" for s in ("Campaign", "Treatment", *[
        s.capitalize() for s in STAGES]))
    body = []
    for (campaign_id, treatment_id), r in wide.iterrows():
        cells = [fmt_count(r["sent"])] + [
            f"{fmt_count(r[s])} ({fmt_pct(r[s] / r['sent'] if r['sent'] else np.nan)})"
            for s in STAGES[1:]]
        body.append(f'<tr><td class="t">{_e(campaign_id)}</td><td class="t">{_e(treatment_id)}'
                    "</td>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _latest_window(state: pd.DataFrame) -> pd.DataFrame:
    """The headline rows (segment ``*``): over all the data when the run has them, else the
    last window that lies within the data (a window never cuts the data's first day off)."""
    everything = state.loc[state["segment"] == ALL]
    overall = overall_rows(everything)
    if len(overall):
        return overall
    windows = complete_windows(everything)
    if not len(windows):
        return windows
    return windows.loc[windows["window_end"] == windows["window_end"].max()]


def _windows_to_chart(state: pd.DataFrame) -> pd.DataFrame:
    """Window rows (segment ``*``) for the over-time chart: those within the data, or, when
    the data are shorter than one window, every window holding sends."""
    everything = state.loc[state["segment"] == ALL]
    windows = complete_windows(everything)
    if len(windows):
        return windows
    if "scope" in everything.columns:
        return everything.loc[everything["scope"] != OVERALL_SCOPE]
    return everything


POLICY_ROWS = (("logged", "realised", "Realised (logging policy)"),
               ("uniform", "snips", "Uniform random · SNIPS"),
               ("uniform", "dr", "Uniform random · DR"),
               ("greedy", "dr", "Greedy · DR"),
               ("thompson", "dr", "Thompson · DR"))


def policy_chart(policy: pd.DataFrame, width: int = 760) -> str:
    """Click-through per send of each policy: a dot at the estimate, a line over its interval.

    The realised rate of the sends as made comes first; the others are
    off-policy estimates from the same sends and their logged propensities.
    """
    rows = policy.set_index(["policy", "method"])
    shown = [(label, rows.loc[(p, m)]) for p, m, label in POLICY_ROWS if (p, m) in rows.index]
    label_w, note_w, row_h, top = 210, 200, 28, 8
    plot_w = width - label_w - note_w
    hi = max(float(r["ci_high"]) for _, r in shown) * 1.1 or 1.0
    to_x = lambda v: label_w + max(0.0, float(v)) / hi * plot_w  # noqa: E731
    height = top + row_h * len(shown) + 28
    body = [f'<line x1="{label_w}" y1="{height - 24}" x2="{label_w + plot_w}" '
            f'y2="{height - 24}" stroke="{MUTED}"/>']
    for tick in nice_ticks(0.0, hi):
        body.append(_text(to_x(tick), height - 10, fmt_pct(tick), size=11, anchor="middle",
                          color="#64748b"))
    if shown and shown[0][0] == POLICY_ROWS[0][2]:   # the realised rate, as a reference line
        x = to_x(shown[0][1]["value"])
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - 24}" '
                    f'stroke="{PALETTE[0]}" stroke-dasharray="3 3" stroke-opacity="0.6"/>')
    for i, (label, r) in enumerate(shown):
        y = top + i * row_h + 12
        color = PALETTE[0] if i == 0 else PALETTE[1 + (i - 1) % (len(PALETTE) - 1)]
        body.append(_text(label_w - 8, y + 4, label, anchor="end"))
        body.append(f'<line x1="{to_x(r["ci_low"]):.1f}" y1="{y}" x2="{to_x(r["ci_high"]):.1f}" '
                    f'y2="{y}" stroke="{color}" stroke-width="3"/>')
        body.append(f'<circle cx="{to_x(r["value"]):.1f}" cy="{y}" r="5" fill="{color}"/>')
        body.append(_text(label_w + plot_w + 8, y + 4,
                          f"{r['value']:.2%} [{r['ci_low']:.2%}, {r['ci_high']:.2%}]",
                          size=12, color="#475569"))
    return _svg(width, height, body, "Click-through per send: realised and off-policy estimates")


def _policy(policy: pd.DataFrame) -> str:
    if not len(policy):
        return ('<p class="note">No sends recorded a propensity, so no policy can be '
                "evaluated off-policy.</p>")
    rows = policy.set_index(["policy", "method"])
    first = policy.iloc[0]
    note = (f"{fmt_count(first['sends'])} sends with a logged propensity"
            + (f" ({fmt_count(first['sends_without_propensity'])} without, left out)"
               if first["sends_without_propensity"] else ""))
    if ("lift_vs_uniform", "snips") in rows.index:
        lift = rows.loc[("lift_vs_uniform", "snips")]
        note += (f"; realised minus uniform random: {lift['value']:+.2%} per send "
                 f"[{lift['ci_low']:+.2%}, {lift['ci_high']:+.2%}]")
    return (f"{policy_chart(policy)}<p class=\"note\">{_e(note)}. Greedy and Thompson are "
            "learned from these same sends, so their estimates lean optimistic.</p>")


def posterior_chart(state: pd.DataFrame, width: int = 760, height: int = 300) -> str:
    """Beta posterior densities of the leading treatments in the latest window.

    Only the `DENSITY_ARMS` treatments most likely to be best are drawn; the
    table beside it lists them all.
    """
    latest = _latest_window(state).sort_values(["p_best", "mean"], ascending=False)
    shown = latest.head(DENSITY_ARMS)
    left, right, top, bottom = 50, 190, 12, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    low, high = float(shown["ci_low"].min()), float(shown["ci_high"].max())
    lo = max(0.0, low - 0.5 * (high - low))
    hi = min(1.0, high + 0.25 * (high - low) + 1e-4)
    x = np.linspace(lo, hi, 240)
    curves = [stats.beta.pdf(x, r.alpha, r.beta) for r in shown.itertuples(index=False)]
    peak = max(float(np.nanmax(c)) for c in curves) or 1.0
    sx = left + (x - lo) / (hi - lo) * plot_w
    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
            f'stroke="{MUTED}"/>']
    for tick in nice_ticks(lo, hi):
        tx = left + (tick - lo) / (hi - lo) * plot_w
        body.append(_text(tx, top + plot_h + 16, fmt_pct(tick), size=11, anchor="middle",
                          color="#64748b"))
    body.append(_text(left + plot_w / 2, height - 2, "click-through rate (posterior)",
                      size=11, anchor="middle", color="#64748b"))
    for i, (r, curve) in enumerate(zip(shown.itertuples(index=False), curves)):
        color = PALETTE[i % len(PALETTE)]
        sy = top + plot_h - curve / peak * plot_h
        area = np.concatenate([[top + plot_h], sy, [top + plot_h]])
        body.append(f'<polygon points="{_polyline(np.r_[sx[0], sx, sx[-1]], area)}" '
                    f'fill="{color}" fill-opacity="0.08" stroke="none"/>')
        body.append(f'<polyline points="{_polyline(sx, sy)}" fill="none" stroke="{color}" '
                    'stroke-width="2"/>')
        ly = top + 14 + i * 18
        body.append(f'<rect x="{left + plot_w + 14}" y="{ly - 9}" width="12" height="4" '
                    f'fill="{color}"/>')
        body.append(_text(left + plot_w + 30, ly - 3,
                          f"{r.treatment_id} · P(best) {fmt_pct(r.p_best)}", size=11))
    return _svg(width, height, body, "Posterior click-through densities per treatment")


def _state_table(state: pd.DataFrame) -> str:
    latest = _latest_window(state).sort_values(["p_best", "mean"], ascending=False)
    head = "".join(f"<th>{h}</th>" for h in (
        "Treatment", "Sent", "Views", "Clicks", "CTR", "95% interval", "P(best)", "Weight"))
    body = "".join(
        f'<tr><td class="t">{_e(r.treatment_id)}</td><td>{fmt_count(r.sent)}</td>'
        f"<td>{fmt_count(r.views)}</td><td>{fmt_count(r.clicks)}</td><td>{fmt_pct(r.mean)}</td>"
        f"<td>{fmt_pct(r.ci_low)} – {fmt_pct(r.ci_high)}</td><td>{fmt_pct(r.p_best)}</td>"
        f"<td>{fmt_pct(r.weight)}</td></tr>" for r in latest.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def ctr_over_time(state: pd.DataFrame, panel_w: int = 260, panel_h: int = 120) -> str:
    """Small multiples: each treatment's posterior mean CTR per window with its 95% band.

    Panels share one y scale so treatments compare at a glance; they are
    ordered by the latest P(best), best first. The scale tops out at the 90th
    percentile of the upper bounds, so the wide intervals of the first, thin
    windows do not flatten every line; bands beyond it are cut at the top.
    """
    overall = _windows_to_chart(state)
    order = _latest_window(state).sort_values(["p_best", "mean"], ascending=False)
    treatments = order["treatment_id"].head(SMALL_MULTIPLES).tolist()
    ends = overall["window_end"]
    t0, t1 = ends.min(), ends.max()
    span = max((t1 - t0) / pd.Timedelta(seconds=1), 1.0)
    highs = overall.loc[overall["treatment_id"].isin(treatments), "ci_high"].to_numpy(float)
    y_max = float(min(np.quantile(highs, 0.9) * 1.1, 1.0)) if highs.size else 1.0
    left, top, bottom, right = 42, 22, 20, 8
    plot_w, plot_h = panel_w - left - right, panel_h - top - bottom
    panels = []
    for i, treatment in enumerate(treatments):
        rows = overall.loc[overall["treatment_id"] == treatment].sort_values("window_end")
        seconds = ((rows["window_end"] - t0) / pd.Timedelta(seconds=1)).to_numpy(float)
        sx = left + seconds / span * plot_w
        to_y = lambda v: top + plot_h - np.minimum(  # noqa: E731
            np.asarray(v, dtype=float) / y_max, 1.0) * plot_h
        color = PALETTE[i % len(PALETTE)]
        latest = rows.iloc[-1]
        body = [_text(left, 14, f"{treatment} · {fmt_pct(latest['mean'])}", size=12,
                      weight="600"),
                f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
                f'y2="{top + plot_h}" stroke="{MUTED}"/>',
                _text(left - 4, top + 4, fmt_pct(y_max), size=10, anchor="end", color="#64748b"),
                _text(left - 4, top + plot_h, "0%", size=10, anchor="end", color="#64748b"),
                _text(left, panel_h - 4, f"{t0:%b %d}", size=10, color="#64748b"),
                _text(left + plot_w, panel_h - 4, f"{t1:%b %d}", size=10, anchor="end",
                      color="#64748b")]
        band = np.r_[to_y(rows["ci_high"]), to_y(rows["ci_low"])[::-1]]
        body.append(f'<polygon points="{_polyline(np.r_[sx, sx[::-1]], band)}" '
                    f'fill="{color}" fill-opacity="0.18" stroke="none"/>')
        body.append(f'<polyline points="{_polyline(sx, to_y(rows["mean"]))}" fill="none" '
                    f'stroke="{color}" stroke-width="1.8"/>')
        panels.append(_svg(panel_w, panel_h, body, f"CTR of {treatment} over time"))
    return '<div class="grid">' + "".join(panels) + "</div>"


def histogram_chart(bins: pd.DataFrame, title: str, width: int = 760, height: int = 220) -> str:
    """Vertical bars of a `campaign_time_to_order` histogram, one per bin, labelled below."""
    left, top, bottom = 40, 16, 40
    plot_w, plot_h = width - left - 10, height - top - bottom
    n = max(len(bins), 1)
    step = plot_w / n
    peak = max(float(bins["orders"].max()) if len(bins) else 0.0, 1.0)
    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
            f'stroke="{MUTED}"/>']
    for i, r in enumerate(bins.itertuples(index=False)):
        h = r.orders / peak * plot_h
        x = left + i * step
        body.append(f'<rect x="{x + 3:.1f}" y="{top + plot_h - h:.1f}" width="{step - 6:.1f}" '
                    f'height="{h:.1f}" rx="2" fill="{PALETTE[0]}"/>')
        if r.orders:
            body.append(_text(x + step / 2, top + plot_h - h - 4, fmt_count(r.orders), size=11,
                              anchor="middle"))
        body.append(_text(x + step / 2, top + plot_h + 16, r.label, size=10, anchor="middle",
                          color="#64748b"))
    body.append(_text(left + plot_w / 2, height - 4, "hours from send to order", size=11,
                      anchor="middle", color="#64748b"))
    return _svg(width, height, body, title)


def _time_to_order(table: pd.DataFrame) -> str:
    total = table.loc[table["campaign_id"] == ALL]
    q = total.loc[total["kind"] == "quantile"].set_index("label")
    bins = total.loc[total["kind"] == "histogram"].sort_values("hours_low")
    n = int(q["orders"].max()) if len(q) else 0
    if not n:
        return '<p class="note">No attributed orders yet.</p>'
    sentence = (f"Half of the {fmt_count(n)} attributed orders came within "
                f"{fmt_hours(q.loc['p50', 'hours_low'])} of the send; a quarter within "
                f"{fmt_hours(q.loc['p25', 'hours_low'])}, nine in ten within "
                f"{fmt_hours(q.loc['p90', 'hours_low'])}.")
    return (f'<p class="note">{_e(sentence)}</p>'
            + histogram_chart(bins, "Time from e-mail to order"))


def _revenue(table: pd.DataFrame) -> str:
    total = table.loc[table["campaign_id"] == ALL].set_index("path").reindex(list(PATHS))
    rows = [(path, float(r.revenue), f"{fmt_money(r.revenue)} · {fmt_count(r.orders)} orders"
             f" · {fmt_pct(r.share_of_revenue)} · AOV {fmt_money(r.aov)}")
            for path, r in total.fillna(0).iterrows()]
    return hbar_chart(rows, "Attributed revenue by conversion path", color=PALETTE[2])


def _aov(table: pd.DataFrame) -> str:
    groups = table.set_index("group").reindex(list(AOV_GROUPS))
    rows = [(AOV_LABELS[g], float(r.aov) if np.isfinite(r.aov) else 0.0,
             f"{fmt_money(r.aov)} · {fmt_count(r.orders)} orders")
            for g, r in groups.fillna({"aov": 0.0, "orders": 0}).iterrows()]
    span = ""
    if len(table) and pd.notna(table["span_start"].iloc[0]):
        span = (f'<p class="note">Orders placed {table["span_start"].iloc[0]:%Y-%m-%d} to '
                f'{table["span_end"].iloc[0]:%Y-%m-%d} (first send to last send plus the '
                "attribution window).</p>")
    return span + hbar_chart(rows, "Average order value", color=PALETTE[3])


def _failures(table: pd.DataFrame) -> str:
    total = table.loc[table["campaign_id"] == ALL].head(10)
    if not len(total):
        return '<p class="note">No delivery failures.</p>'
    rows = [(str(r.reason), float(r.failures),
             f"{fmt_count(r.failures)} · {fmt_pct(r.share_of_sent)} of sent")
            for r in total.itertuples(index=False)]
    return hbar_chart(rows, "Delivery failures by reason", color=PALETTE[1])


def render(tables: Mapping[str, pd.DataFrame], meta: Mapping[str, str]) -> str:
    """The whole report page.

    Args:
        tables: The five campaign tables and ``bandit_state``, as frames, and
            optionally ``campaign_policy_value``.
        meta: Strings for the header: run_id, status, message, and optionally
            generated_at, attribution_days, window_days.
    """
    funnel, state = tables["campaign_funnel"], tables["bandit_state"]
    status = meta.get("status", "")
    campaigns = sorted(set(funnel["campaign_id"]) - {ALL})
    sub = (f"Campaigns: {', '.join(campaigns) or 'none'} · attribution window "
           f"{meta.get('attribution_days', '?')} days · run {meta.get('run_id', '')}"
           f" · generated {meta.get('generated_at', '')}")
    parts: List[str] = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>Campaign report</title><style>{CSS}</style></head><body><main>",
        f'<h1>Campaign report <span class="badge {_e(status)}">{_e(status)}</span></h1>',
        f'<p class="sub">{_e(sub)}</p>',
        f'<p class="note">{_e(meta.get("message", ""))}</p>',
        _cards(funnel, tables["campaign_revenue_by_path"], tables["campaign_aov"]),
        "<h2>Funnel</h2><p class=\"sub\">Recipients reaching each stage; ordered = an order "
        "within the attribution window after the send.</p>",
        f'<div class="panel">{funnel_chart(funnel)}</div>',
        f'<div class="panel">{_treatment_table(funnel)}</div>',
        "<h2>Which treatment is winning</h2>",
    ]
    latest = _latest_window(state)
    if len(latest):
        window = latest.iloc[0]
        over = ("over all the data" if "scope" in latest.columns
                and window["scope"] == OVERALL_SCOPE else "for the window")
        parts += [
            f'<p class="sub">Bandit posteriors {over} {window["window_start"]:%Y-%m-%d %H:%M} '
            f'to {window["window_end"]:%Y-%m-%d %H:%M} (views → clicks of the sends made in '
            "it, Beta-Binomial; P(best) by Monte Carlo).</p>",
            f'<div class="panel">{posterior_chart(state)}</div>',
            f'<div class="panel">{_state_table(state)}</div>',
            f"<h2>Click-through over time</h2><p class=\"sub\">Posterior mean CTR per "
            f"{_e(meta.get('window_days', '?'))}-day sliding window, with its 95% interval.</p>",
            f'<div class="panel">{ctr_over_time(state)}</div>',
        ]
    else:
        parts.append('<p class="note">No bandit state: no views in any window.</p>')
    if "campaign_policy_value" in tables:
        parts += [
            "<h2>Click-through per send</h2><p class=\"sub\">Realised under the policy that "
            "made the sends, and what uniform random, greedy and Thompson allocation would "
            "have earned, estimated off-policy from the same sends (IPS, self-normalised IPS, "
            "doubly robust) with 95% bootstrap intervals.</p>",
            f'<div class="panel">{_policy(tables["campaign_policy_value"])}</div>',
        ]
    parts += [
        "<h2>Revenue by conversion path</h2><p class=\"sub\">Each order is attributed once, "
        "to the buyer's latest send within the window.</p>",
        f'<div class="panel">{_revenue(tables["campaign_revenue_by_path"])}</div>',
        "<h2>Average order value</h2>",
        f'<div class="panel">{_aov(tables["campaign_aov"])}</div>',
        "<h2>Time from e-mail to order</h2>",
        f'<div class="panel">{_time_to_order(tables["campaign_time_to_order"])}</div>',
        "<h2>Delivery failures</h2>",
        f'<div class="panel">{_failures(tables["campaign_delivery_failures"])}</div>',
        "</main></body></html>",
    ]
    return "\n".join(parts)
