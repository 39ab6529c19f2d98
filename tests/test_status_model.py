"""models.status on hand-made snapshots: alarm order, other jobs' rows, the chain after a rollback."""
import json

import numpy as np
import pandas as pd

from models import status
from models.config import StatusConfig

NOW = pd.Timestamp("2026-03-02T06:00:00Z")


def _run(run_id, job="batch_recommendations", state="published", written=100, hours_ago=1.0,
         **extra):
    return {"run_id": run_id, "job": job, "status": state, "message": f"{state} {written}",
            "finished_at": NOW - pd.Timedelta(hours=hours_ago),
            "recommendations_written": written, "dead_lettered": 1, "qa_violations": 0,
            "counters": json.dumps({"users.read": 100, "events.read": 900}),
            "source_commit": "a" * 40, "template_version": "v1", "config_digest": "d",
            "model_version": "segment-popularity-v1", **extra}


def _snapshot(runs, published_run="r1", rows=100, hours_ago=1.0, **extra):
    return status.Snapshot(
        now=NOW, location="test", runs=pd.DataFrame(runs),
        published={"rows": rows, "generated_at": NOW - pd.Timedelta(hours=hours_ago),
                   "run_ids": [published_run], "model_versions": ["segment-popularity-v1"]},
        **extra)


def test_other_jobs_rows_with_nulls_are_listed_not_judged():
    runs = [_run("report", job="bandit_report", state="done", written=np.nan),
            _run("r1", hours_ago=2)]
    runs[0]["dead_lettered"] = np.nan
    snap = _snapshot(runs)
    found = status.alarms(snap, StatusConfig())
    assert found == []
    text = status.render_text(snap, found, StatusConfig())
    assert "report" in text and "bandit_report" in text and ": OK" in text
    assert "<svg" in status.render_html(snap, found, StatusConfig())


def test_several_alarms_are_all_named_and_the_most_specific_sets_the_exit():
    runs = [_run("r2", state="gated", written=0, hours_ago=0.5), _run("r1", hours_ago=40)]
    snap = _snapshot(runs, hours_ago=40, streaming={"emitted_at": NOW - pd.Timedelta(hours=3)})
    found = status.alarms(snap, StatusConfig())
    assert [a.name for a in found] == ["zero_rows", "gated", "stale_output", "stale_streaming"]
    assert status.exit_code(found) == 4
    assert status.exit_code(found[2:]) == 5 and status.exit_code([]) == 0


def test_a_rollback_is_a_divergence_the_chain_names():
    runs = [_run("rollback_x", job="rollback", state="rolled_back"), _run("r2"), _run("r1")]
    snap = _snapshot(runs, published_run="r1")
    lines = status.verify(snap, status.TemplateInfo("spec", "img:v1", "v1", "a" * 40))
    assert lines == ["the published rows come from run(s) r1, not from the last published "
                     "run r2 (a rollback, or a table written outside the job)"]


def test_a_short_commit_matches_its_full_form_and_a_run_before_19_is_named():
    snap = _snapshot([_run("r1")])
    assert status.verify(snap, status.TemplateInfo("spec", None, "v1", "aaaaaaa")) == []
    old = _run("r1", source_commit=None)
    lines = status.verify(_snapshot([old]), status.TemplateInfo("spec", None, "v1", "a" * 40))
    assert lines == ["the last batch run r1 records no source_commit (made before runs "
                     "recorded it); the template has " + "a" * 40]


def test_dead_letters_above_the_share_are_flagged():
    run = _run("r1", dead_lettered=50)  # 50 of 1,000 records read
    found = status.alarms(_snapshot([run]), StatusConfig(max_dead_letter_share=0.01))
    assert [a.name for a in found] == ["dead_letters"] and "5.00%" in found[0].message
    assert status.alarms(_snapshot([run]), StatusConfig(max_dead_letter_share=0.1)) == []
