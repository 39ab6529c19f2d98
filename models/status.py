"""Is production healthy? The alarms, the chain check and the pages of ``pipelines.status``.

The system this product grew from had "silent failures where workflows pass
but models don't update": a scheduler reported success while the table in use
was old. ``python -m pipelines.status`` reads the warehouse (a
:class:`Snapshot`, gathered by ``transforms.status``) and this module decides,
with no I/O and no Beam:

* :func:`alarms`: the published output is older than allowed, the last batch
  run was gated or wrote zero rows, the streaming health is stale, or too many
  records were dead-lettered; each alarm has an exit code (:data:`EXIT_CODES`)
  so a scheduler or a probe can act on the status alone;
* :func:`verify`: the deployed template, the last run and the published rows
  name the same commit, template version and model (``models.provenance``);
* :func:`render_text` and :func:`render_html`: what an operator reads, the
  page with inline SVG trend plots of the last runs.

:func:`run_health_line` is the one log line per run that the log-based metrics
of ``templates/alerts`` parse; its format is a contract with those files.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd

from models.config import StatusConfig

BATCH_JOB = "batch_recommendations"
OK = 0
# Exit codes, one per alarm, aligned with pipelines/jobs.py (1 gated, 2 usage, 3 failure).
GATED = "gated"
ZERO_ROWS = "zero_rows"
STALE_OUTPUT = "stale_output"
STALE_STREAMING = "stale_streaming"
CHAIN = "chain_diverges"
DEAD_LETTERS = "dead_letters"
USAGE = 2
FAILURE = 3
EXIT_CODES: Dict[str, int] = {GATED: 1, ZERO_ROWS: 4, STALE_OUTPUT: 5, STALE_STREAMING: 6,
                              CHAIN: 7, DEAD_LETTERS: 8}
# When several alarms hold, the exit code is the first of these: the most specific cause.
SEVERITY = (ZERO_ROWS, GATED, STALE_OUTPUT, STALE_STREAMING, CHAIN, DEAD_LETTERS)
RUN_HEALTH_PREFIX = "run_health"


class Alarm(NamedTuple):
    """One reason to page someone: what was seen, and what to do (docs/operations.md)."""

    name: str
    message: str
    action: str

    @property
    def code(self) -> int:
        return EXIT_CODES[self.name]


@dataclasses.dataclass
class Snapshot:
    """What the warehouse says, read once (``transforms.status.read_snapshot``).

    Attributes:
      now: the time ages are measured against.
      location: the warehouse, as its ``location`` names it.
      runs: the last ``pipeline_runs`` rows of every job, newest first.
      qa: the ``qa_checks`` rows of those runs.
      published: what the production ``recommendations`` table holds: ``rows``,
        ``generated_at`` (newest), ``run_ids`` and ``model_versions`` (sorted
        lists); None when there is no such table.
      backups: ``list_backups()`` of the warehouse.
      stability: ``stability_report`` rows of the runs (may be empty).
      streaming: the newest ``streaming_health`` row, None when there is none;
        ``streaming_expected`` says whether its absence is itself an alarm.
      changes: ``stability_changes`` rows of the last batch run (may be empty).
    """

    now: pd.Timestamp
    location: str
    runs: pd.DataFrame
    qa: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    published: Optional[Dict[str, Any]] = None
    backups: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    stability: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    streaming: Optional[Dict[str, Any]] = None
    streaming_expected: bool = False
    changes: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def batch_runs(self) -> pd.DataFrame:
        """The batch job's runs, newest first."""
        if self.runs.empty:
            return self.runs
        return self.runs[self.runs["job"] == BATCH_JOB]

    def last_batch_run(self) -> Optional[pd.Series]:
        runs = self.batch_runs()
        return None if runs.empty else runs.iloc[0]

    def last_published_run(self) -> Optional[pd.Series]:
        runs = self.batch_runs()
        runs = runs[runs["status"] == "published"] if not runs.empty else runs
        return None if runs.empty else runs.iloc[0]


# --------------------------------------------------------------------------- the log line

def records_read(counters: Mapping[str, Any]) -> int:
    """Records read from every input (the ``<table>.read`` counters)."""
    return int(sum(int(v) for k, v in counters.items()
                   if k.endswith(".read") and k.count(".") == 1))


def dead_letter_share(dead_lettered: Any, counters: Mapping[str, Any]) -> float:
    """Dead-lettered records per record read (0 when nothing was read)."""
    read = records_read(counters)
    return float(dead_lettered or 0) / read if read else 0.0


def _counters(value: Any) -> Dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value:
        try:
            return json.loads(value)
        except ValueError:
            return {}
    return {}


def run_health_line(row: Mapping[str, Any]) -> str:
    """The one line a finished batch run logs, parsed by the log-based metrics.

    ``key=value`` pairs after ``run_health``; values never contain spaces.
    templates/alerts/metrics/*.json match ``status=``, ``recommendations_written=``
    and ``retrain_recommended=``, and extract ``dead_letter_share=``: change them together.

    >>> run_health_line({"job": "batch_recommendations", "run_id": "r1", "status": "gated",
    ...                  "recommendations_written": 0, "dead_lettered": 5,
    ...                  "counters": '{"users.read": 100, "events.read": 400}'})
    'run_health job=batch_recommendations run_id=r1 status=gated recommendations_written=0 \
dead_lettered=5 records_read=500 dead_letter_share=0.010000 source_commit=- \
template_version=- model_version=- retrain_recommended=0'
    """
    counters = _counters(row.get("counters"))
    fields = {
        "job": row.get("job"), "run_id": row.get("run_id"), "status": row.get("status"),
        "recommendations_written": int(row.get("recommendations_written") or 0),
        "dead_lettered": int(row.get("dead_lettered") or 0),
        "records_read": records_read(counters),
        "dead_letter_share": f"{dead_letter_share(row.get('dead_lettered'), counters):.6f}",
        "source_commit": row.get("source_commit"),
        "template_version": row.get("template_version"),
        "model_version": row.get("model_version"),
        "retrain_recommended": int(counters.get("ranker.retrain_recommended", 0) or 0),
    }
    return " ".join([RUN_HEALTH_PREFIX] + [
        f"{k}={str(v).replace(' ', '_') if v not in (None, '') else '-'}"
        for k, v in fields.items()])


# --------------------------------------------------------------------------- alarms

def _timestamp(value: Any) -> Optional[pd.Timestamp]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        return None
    if pd.isna(stamp):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def age_hours(now: pd.Timestamp, then: Any) -> Optional[float]:
    """Hours from ``then`` to ``now`` (None when ``then`` is unknown)."""
    stamp = _timestamp(then)
    return None if stamp is None else (now - stamp).total_seconds() / 3600.0


def alarms(snapshot: Snapshot, config: StatusConfig) -> List[Alarm]:
    """Every alarm the snapshot raises, most severe first (see :data:`SEVERITY`)."""
    found: List[Alarm] = []
    last = snapshot.last_batch_run()
    if last is not None and last["status"] == "gated":
        if _int(last.get("recommendations_written")) == 0:
            found.append(Alarm(ZERO_ROWS, f"the last batch run {last['run_id']} wrote zero "
                                          f"recommendations ({last['message']})",
                               "an input is empty or every user was refused: read the run's "
                               "counters and dead_letter rows; production still holds the "
                               "previous output"))
        found.append(Alarm(GATED, f"the last batch run {last['run_id']} was gated: "
                                  f"{last['message']}",
                           "read its qa_checks rows and summary; fix the data or config, "
                           "or rerun with --accept_changes if the churn is explained"))
    published = snapshot.published
    if published is not None and published.get("rows", 0) == 0:
        found.append(Alarm(ZERO_ROWS, "the published recommendations table holds zero rows",
                           "roll back to a backup (python -m pipelines.publish list / "
                           "rollback) and find the run that published it"))
    limit = config.max_published_age_hours
    if published is None:
        found.append(Alarm(STALE_OUTPUT, "nothing is published: no recommendations table",
                           "run the batch job (or check that its schedule exists)"))
    else:
        age = age_hours(snapshot.now, published.get("generated_at"))
        if age is None or age > limit:
            shown = "unknown" if age is None else f"{age:.1f} h"
            found.append(Alarm(STALE_OUTPUT, f"the published recommendations are {shown} old "
                                             f"(limit {limit:g} h)",
                               "check the scheduler job and the last batch runs: did one "
                               "start, fail (exit 3) or get gated (exit 1)?"))
    found += _streaming_alarms(snapshot, config)
    if last is not None:
        share = dead_letter_share(last.get("dead_lettered"), _counters(last.get("counters")))
        if share > config.max_dead_letter_share:
            found.append(Alarm(DEAD_LETTERS, f"the last batch run {last['run_id']} "
                                             f"dead-lettered {share:.2%} of the records it "
                                             f"read (limit {config.max_dead_letter_share:.2%})",
                               "group its dead_letter rows by reason; a new reason usually "
                               "means an upstream export changed"))
    order = {name: i for i, name in enumerate(SEVERITY)}
    unique = {(a.name, a.message): a for a in found}
    return sorted(unique.values(), key=lambda a: order[a.name])


def _streaming_alarms(snapshot: Snapshot, config: StatusConfig) -> List[Alarm]:
    limit = config.max_streaming_health_age_minutes
    row = snapshot.streaming
    if row is None:
        if not snapshot.streaming_expected:
            return []
        return [Alarm(STALE_STREAMING, "no streaming_health row: the streaming job has "
                                       "written none", "check that the streaming job runs "
                                                       "(gcloud dataflow jobs list --status=active)")]
    age = age_hours(snapshot.now, row.get("emitted_at"))
    if age is not None and age * 60 <= limit:
        return []
    shown = "unknown" if age is None else f"{age * 60:.0f} min"
    return [Alarm(STALE_STREAMING, f"the newest streaming_health row is {shown} old "
                                   f"(limit {limit:g} min)",
                  "the streaming job stopped, is stuck or cannot write: read its job logs "
                  "and its streaming_dead_letter rows")]


def exit_code(found: Sequence[Alarm]) -> int:
    """0 when nothing is wrong, else the code of the most severe alarm."""
    return min((a for a in found), key=lambda a: SEVERITY.index(a.name)).code if found else OK


# --------------------------------------------------------------------------- the chain

class TemplateInfo(NamedTuple):
    """What the deployed template says about itself (its spec in Cloud Storage)."""

    where: str
    image: Optional[str]
    template_version: Optional[str]
    source_commit: Optional[str]


def template_info(spec: Mapping[str, Any], where: str) -> TemplateInfo:
    """The version and commit a Flex Template spec carries.

    ``templates/deploy.sh templates`` writes them as the spec's
    ``defaultEnvironment.additionalUserLabels`` (``template_version``,
    ``source_commit``), which Dataflow also puts on every job it launches; a
    spec without labels still names its image, whose tag is the version.

    >>> template_info({"image": "r/segment-recs/batch_recommendations:abc123"}, "x")
    TemplateInfo(where='x', image='r/segment-recs/batch_recommendations:abc123', \
template_version='abc123', source_commit=None)
    """
    image = spec.get("image")
    labels = (spec.get("defaultEnvironment") or {}).get("additionalUserLabels") or {}
    tag = image.rsplit(":", 1)[1] if isinstance(image, str) and ":" in image.rsplit("/", 1)[-1] \
        else None
    return TemplateInfo(where, image, labels.get("template_version") or tag,
                        labels.get("source_commit"))


def _same_commit(a: Optional[str], b: Optional[str]) -> bool:
    """Equal commits, a short SHA matching its full form."""
    if not a or not b:
        return False
    a, b = a.lower(), b.lower()
    return a.startswith(b) or b.startswith(a) if min(len(a), len(b)) >= 7 else a == b


def verify(snapshot: Snapshot, template: Optional[TemplateInfo]) -> List[str]:
    """Where the deployed template, the last run and the published rows disagree (empty: agree).

    Checked: the last batch run was made by the deployed template (commit and
    version); the published rows are the last published run's (run id) and
    carry its model version; the last batch run is the one that published.
    """
    found: List[str] = []
    last = snapshot.last_batch_run()
    publisher = snapshot.last_published_run()
    if last is None:
        return ["no batch run is recorded: nothing to check against"]
    if template is not None:
        for field in ("source_commit", "template_version"):
            deployed, ran = getattr(template, field), last.get(field)
            if deployed is None:
                found.append(f"the deployed template ({template.where}) records no {field}")
            elif ran is None or (isinstance(ran, float) and math.isnan(ran)):
                found.append(f"the last batch run {last['run_id']} records no {field} (made "
                             f"before runs recorded it); the template has {deployed}")
            elif not (_same_commit(deployed, ran) if field == "source_commit"
                      else deployed == ran):
                found.append(f"{field} differs: the deployed template ({template.where}) has "
                             f"{deployed}, the last batch run {last['run_id']} ran {ran}")
    if publisher is None:
        found.append("no batch run has published: the published rows have no run to match")
    else:
        if publisher["run_id"] != last["run_id"]:
            found.append(f"the last batch run {last['run_id']} ({last['status']}) did not "
                         f"publish; production holds the output of run {publisher['run_id']}")
        published = snapshot.published or {}
        held = published.get("run_ids") or []
        if held != [publisher["run_id"]]:
            found.append(f"the published rows come from run(s) {', '.join(held) or 'none'}, "
                         f"not from the last published run {publisher['run_id']} "
                         f"(a rollback, or a table written outside the job)")
        models = published.get("model_versions") or []
        recorded = publisher.get("model_version")
        if recorded and isinstance(recorded, str) and ",".join(models) != recorded:
            found.append(f"model version differs: the published rows carry "
                         f"{', '.join(models) or 'none'}, run {publisher['run_id']} "
                         f"recorded {recorded}")
    return found


# --------------------------------------------------------------------------- text

def _int(value: Any) -> int:
    """A count from a warehouse cell (NULL/NaN in another job's row: 0)."""
    try:
        return 0 if value is None or pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return 0


def _value(row: Optional[Mapping[str, Any]], key: str, default: str = "-") -> str:
    if row is None:
        return default
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value)


def qa_summary(qa: pd.DataFrame, run_id: str) -> str:
    """``rules 0 violations; gates tripped: churn`` for one run."""
    if qa.empty or "run_id" not in qa:
        return "no qa_checks rows"
    rows = qa[qa["run_id"] == run_id]
    if rows.empty:
        return "no qa_checks rows"
    rules = rows[rows["rule_id"] <= 100]
    gates = rows[(rows["rule_id"] > 100) & (rows["violations"] > 0)]
    text = f"rules {int(rules['violations'].sum())} violations"
    return text + ("; gates tripped: " + ", ".join(gates["name"]) if len(gates) else
                   "; no gate tripped")


def drift_line(run: Optional[Mapping[str, Any]]) -> str:
    """Ranker drift of a run (the batch job's counters), or why there is none."""
    counters = _counters(run.get("counters")) if run is not None else {}
    if "ranker.psi_max_milli" not in counters:
        return "no ranker in the last run (no drift measured)"
    flag = "RETRAIN RECOMMENDED" if counters.get("ranker.retrain_recommended") else "no drift"
    return f"max PSI {counters['ranker.psi_max_milli'] / 1000:.3f}: {flag}"


def render_text(snapshot: Snapshot, found: Sequence[Alarm], config: StatusConfig,
                divergences: Optional[Sequence[str]] = None) -> str:
    """The status as lines an operator reads: verdict first, then the evidence."""
    lines = [f"status of {snapshot.location} at {snapshot.now.isoformat()}: "
             + ("OK" if not found else "ALARM (" + ", ".join(a.name for a in found) + ")")]
    for alarm in found:
        lines.append(f"  ALARM {alarm.name} (exit {alarm.code}): {alarm.message}; "
                     f"do: {alarm.action}")
    published = snapshot.published
    if published is None:
        lines.append("published: nothing")
    else:
        age = age_hours(snapshot.now, published.get("generated_at"))
        lines.append(f"published: {published.get('rows', 0):,} rows from run(s) "
                     f"{', '.join(published.get('run_ids') or []) or '-'}, generated "
                     f"{_value(published, 'generated_at')} ("
                     + ("age unknown" if age is None else f"{age:.1f} h old")
                     + f", limit {config.max_published_age_hours:g} h), model "
                     f"{', '.join(published.get('model_versions') or []) or '-'}")
    publisher = snapshot.last_published_run()
    if publisher is not None:
        lines.append(f"made by: commit {_value(publisher, 'source_commit')}, template "
                     f"{_value(publisher, 'template_version')}, config "
                     f"{_value(publisher, 'config_digest')}, model "
                     f"{_value(publisher, 'model_version')}")
    lines.append("ranker drift: " + drift_line(snapshot.last_batch_run()))
    lines.append(f"last runs ({len(snapshot.runs)}):")
    for run in snapshot.runs.to_dict("records"):
        lines.append(f"  {run['run_id']:32s} {run['job']:22s} {str(run['status']):12s} "
                     f"finished {_value(run, 'finished_at')}  written "
                     f"{_int(run.get('recommendations_written')):,}  dead-lettered "
                     f"{_int(run.get('dead_lettered')):,}  "
                     + (qa_summary(snapshot.qa, run["run_id"]) if run["job"] == BATCH_JOB
                        else str(run.get("message") or "")))
    if snapshot.backups is None or snapshot.backups.empty:
        lines.append("backups: none")
    else:
        lines.append(f"backups: {len(snapshot.backups)}, newest "
                     + ", ".join(f"{b.backup_id} ({_int(b.recommendations):,} rows)"
                                 for b in snapshot.backups.head(3).itertuples()))
    lines.append("streaming: " + _streaming_line(snapshot, config))
    lines += _changes_lines(snapshot.changes)
    if divergences is not None:
        lines.append("chain: " + ("template, last run and published rows agree"
                                  if not divergences else "DIVERGES"))
        lines += [f"  {d}" for d in divergences]
    return "\n".join(lines)


def _streaming_line(snapshot: Snapshot, config: StatusConfig) -> str:
    row = snapshot.streaming
    if row is None:
        return ("no streaming_health row" + ("" if snapshot.streaming_expected
                                             else " (not checked)"))
    age = age_hours(snapshot.now, row.get("emitted_at"))
    counters = _counters(row.get("counters"))
    shown = ", ".join(f"{k} {v:,}" for k, v in sorted(counters.items())[:6])
    return (f"newest health row emitted {_value(row, 'emitted_at')} ("
            + ("age unknown" if age is None else f"{age * 60:.0f} min old")
            + f", limit {config.max_streaming_health_age_minutes:g} min)"
            + (f"; {shown}" if shown else ""))


def _changes_lines(changes: pd.DataFrame) -> List[str]:
    if changes is None or changes.empty:
        return []
    from models.stability import format_changes
    return (["changes explained (last batch run vs the output it would replace):"]
            + format_changes(changes))


# --------------------------------------------------------------------------- HTML

CSS = """body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;
color:#1e293b;margin:0;background:#f8fafc}main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 6px}
.ok{color:#166534}.alarm{color:#b91c1c}.sub{color:#64748b;font-size:14px}
.panel{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px;margin:8px 0}
table{border-collapse:collapse;font-size:13px;width:100%}td,th{text-align:left;
padding:4px 8px;border-bottom:1px solid #e2e8f0}.grid{display:grid;
grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def trend_svg(values: Sequence[float], labels: Sequence[str], title: str,
              width: int = 320, height: int = 140, color: str = "#2563eb") -> str:
    """A small line chart of one figure over runs (oldest left), as inline SVG.

    >>> "<polyline" in trend_svg([1, 3, 2], ["a", "b", "c"], "rows")
    True
    """
    ys = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    pad_l, pad_r, pad_t, pad_b = 44, 10, 22, 22
    body = [f'<text x="4" y="14" font-size="12" font-weight="600">{_e(title)}</text>']
    finite = ys[np.isfinite(ys)]
    if not len(finite):
        body.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" font-size="12" '
                    f'text-anchor="middle" fill="#94a3b8">no data</text>')
    else:
        lo, hi = float(min(0.0, finite.min())), float(finite.max())
        hi = hi if hi > lo else lo + 1.0
        n = len(ys)
        xs = (pad_l + (np.arange(n) * (width - pad_l - pad_r) / max(n - 1, 1)))
        scaled = pad_t + (hi - ys) / (hi - lo) * (height - pad_t - pad_b)
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, scaled) if np.isfinite(y))
        body.append(f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" '
                    f'y2="{height - pad_b}" stroke="#cbd5e1"/>')
        for value in (lo, hi):
            y = pad_t + (hi - value) / (hi - lo) * (height - pad_t - pad_b)
            body.append(f'<text x="{pad_l - 4}" y="{y + 4:.1f}" font-size="10" '
                        f'text-anchor="end" fill="#64748b">{value:,.4g}</text>')
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{points}"/>')
        for x, y, label, value in zip(xs, scaled, labels, ys):
            if np.isfinite(y):
                body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}">'
                            f'<title>{_e(label)}: {value:,.6g}</title></circle>')
        if n:
            body.append(f'<text x="{pad_l}" y="{height - 6}" font-size="10" '
                        f'fill="#64748b">{_e(labels[0])}</text>')
            body.append(f'<text x="{width - pad_r}" y="{height - 6}" font-size="10" '
                        f'text-anchor="end" fill="#64748b">{_e(labels[-1])}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{_e(title)}</title>'
            + "".join(body) + "</svg>")


def trends(snapshot: Snapshot) -> Dict[str, List[float]]:
    """Per batch run, oldest first: rows written, dead-letter share, QA violations, churn."""
    runs = snapshot.batch_runs().iloc[::-1]
    churn = {}
    if not snapshot.stability.empty and "changed_0_share" in snapshot.stability:
        common = snapshot.stability.get("users_common", pd.Series(0, index=snapshot.stability.index))
        churn = {r: (1.0 - float(s)) if c else np.nan for r, s, c in zip(
            snapshot.stability["run_id"], snapshot.stability["changed_0_share"], common)}
    return {
        "run_id": list(runs["run_id"]),
        "recommendations written": [float(_int(v)) for v in runs["recommendations_written"]],
        "dead-letter share": [dead_letter_share(d, _counters(c)) for d, c in
                              zip(runs["dead_lettered"], runs["counters"])],
        "QA violations": [float(_int(v)) for v in runs["qa_violations"]],
        "users with a changed list": [churn.get(r, np.nan) for r in runs["run_id"]],
    }


def render_html(snapshot: Snapshot, found: Sequence[Alarm], config: StatusConfig,
                divergences: Optional[Sequence[str]] = None) -> str:
    """One self-contained page (inline CSS and SVG, no script): alarms, trends, the text."""
    verdict = ('<p class="ok">OK: no alarm</p>' if not found else "".join(
        f'<p class="alarm"><b>{_e(a.name)}</b> (exit {a.code}): {_e(a.message)}<br>'
        f'<span class="sub">do: {_e(a.action)}</span></p>' for a in found))
    series = trends(snapshot)
    labels = series.pop("run_id")
    charts = "".join(f'<div class="panel">{trend_svg(v, labels, k)}</div>'
                     for k, v in series.items())
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(_value(run, c))}</td>" for c in (
            "run_id", "job", "status", "finished_at", "recommendations_written",
            "dead_lettered", "qa_violations", "source_commit", "model_version")) + "</tr>"
        for run in snapshot.runs.to_dict("records"))
    head = "".join(f"<th>{c}</th>" for c in ("run", "job", "status", "finished",
                                              "written", "dead-lettered", "QA", "commit",
                                              "model"))
    text = render_text(snapshot, found, config, divergences)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Recommendations status</title><style>{CSS}</style></head><body><main>"
            f"<h1>Recommendations status</h1><p class=\"sub\">{_e(snapshot.location)} at "
            f"{_e(snapshot.now.isoformat())}</p>{verdict}"
            f"<h2>Trends over the last batch runs</h2><div class=\"grid\">{charts}</div>"
            f"<h2>Last runs</h2><div class=\"panel\"><table><tr>{head}</tr>{rows}</table></div>"
            f"<h2>Details</h2><pre class=\"panel\">{_e(text)}</pre></main></body></html>")
