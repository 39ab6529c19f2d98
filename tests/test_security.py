"""Security: injected names and paths are refused, and e-mail addresses never reach the logs.

Every value that ends up in SQL text, a table name, a Pub/Sub path or a file
path is validated before anything runs: by the jobs themselves (a local run
or a launcher) and, for Flex Templates, by each parameter's regex at launch.
"""
import json
import logging
import os
import re

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from models.streaming import is_pubsub_path
from pipelines import batch_recommendations, generate_world
from pipelines import streaming_refresh
from pipelines.options import run_id_of
from templates import metadata as md
from transforms.io import read_frame

SQL = "x`; DROP TABLE recommendations; --"
ESCAPES = ("../../etc", "gs://my-bucket/../../other-bucket", "out/../../..")
NEWLINE = "recs\nDROP TABLE x"
INJECTIONS = (SQL, NEWLINE, "a b", "a'b", 'a"b', "$(rm -rf /)") + ESCAPES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate_world.main(["--preset", "tiny", "--seed", "5", "--out", out])
    return out


# --------------------------------------------------------------------------- templates

def _template_parameters():
    for template in md.TEMPLATES:
        for param in md.build_metadata(template)["parameters"]:
            yield template.job, param


@pytest.mark.parametrize("job,param", list(_template_parameters()),
                         ids=lambda v: v if isinstance(v, str) else v["name"])
def test_template_parameters_refuse_injection(job, param):
    """Every string a launcher could pass is fenced by a regex or a closed list of choices."""
    if param.get("enumOptions"):
        allowed = {o["value"] for o in param["enumOptions"]}
        assert not allowed & set(INJECTIONS)
        return
    regexes = param.get("regexes")
    assert regexes, f"{job}: parameter {param['name']} accepts anything"
    for value in INJECTIONS:
        assert not all(re.fullmatch(r, value) for r in regexes), (param["name"], value)


def test_path_format_refuses_parent_segments_but_not_dots_in_names():
    assert re.fullmatch(md.PATH.regex, "gs://my-bucket/runs/v1..2/out")
    assert re.fullmatch(md.PATH.regex, "out/demo_world")
    for value in ESCAPES + ("..", "a/.."):
        assert not re.fullmatch(md.PATH.regex, value), value


# --------------------------------------------------------------------------- jobs

@pytest.mark.parametrize("bad", ["../escape", "a/b", "a;b", "x\ny", "-flag", "a" * 129])
def test_run_ids_that_could_escape_or_inject_are_refused(bad):
    with pytest.raises(SystemExit, match="--run_id"):
        run_id_of(bad, None)


def test_run_ids_are_kept_or_generated():
    import pandas as pd
    now = pd.Timestamp("2026-03-01T06:00:00Z")
    assert run_id_of("20260301T060000Z_daily.v2", now) == "20260301T060000Z_daily.v2"
    assert re.fullmatch(r"job_20260301T060000Z_[0-9a-f]{6}", run_id_of(None, now, "job"))


def test_batch_job_refuses_an_escaping_run_id_before_writing_anything(world, tmp_path):
    warehouse = tmp_path / "out" / "warehouse.duckdb"
    os.makedirs(warehouse.parent)
    with pytest.raises(SystemExit, match="--run_id"):
        batch_recommendations.run(["--input_dir", world, "--warehouse", str(warehouse),
                                   "--run_id", "../../escaped"])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.listdir(warehouse.parent) == []


STREAMING = ["--events_subscription=projects/demo-project/subscriptions/events",
             "--treatments_subscription=projects/demo-project/subscriptions/treatments",
             "--streaming_dataset=demo-project.recs"]


@pytest.mark.parametrize("flag,value", [
    ("streaming_dataset", f"demo-project.{SQL}"),
    ("streaming_dataset", "demo-project.recs`.x"),
    ("streaming_dataset", "Bad_Project!.recs"),
    ("history_table", "../users"),
    ("history_table", SQL),
    ("events_subscription", "projects/demo-project/subscriptions/a b"),
    ("events_subscription", "projects/demo-project/topics/events"),
    ("treatments_subscription", "projects/../subscriptions/treatments"),
    ("dead_letter_topic", "projects/demo-project/subscriptions/dead"),
    ("run_id", "../x"),
])
def test_streaming_job_refuses_injected_names(world, flag, value):
    argv = [a for a in STREAMING if not a.startswith(f"--{flag}=")]
    options = PipelineOptions(argv + [f"--input_dir={world}", f"--{flag}={value}"])
    with pytest.raises(SystemExit) as refused:
        streaming_refresh.context_from(options)
    assert flag in str(refused.value) or "refusing" in str(refused.value)


def test_streaming_job_accepts_well_formed_names(world):
    ctx = streaming_refresh.context_from(PipelineOptions(
        STREAMING + [f"--input_dir={world}", "--history_table=events",
                     "--dead_letter_topic=projects/demo-project/topics/dead-letters"]))
    assert ctx.dataset == "demo-project.recs"
    assert ctx.table("recommendation_updates") == "demo-project:recs.recommendation_updates"
    assert is_pubsub_path("projects/demo-project/topics/dead-letters", "topics")


# --------------------------------------------------------------------------- logs

def test_batch_job_never_logs_or_prints_an_email(world, tmp_path, caplog, capfd):
    users, _ = read_frame(world, "users")
    emails = {str(e).strip().lower() for e in users["email"].dropna()}
    assert len(emails) > 1000
    caplog.set_level(logging.DEBUG)
    with open(os.path.join(world, "world.json")) as handle:  # without it the history is stale
        as_of = json.load(handle)["as_of"]
    code = batch_recommendations.run(["--input_dir", world, "--warehouse",
                                      str(tmp_path / "warehouse.duckdb"), "--num_shards", "2",
                                      "--as_of", as_of])
    assert code == 0
    out, err = capfd.readouterr()
    text = "\n".join([out, err] + [r.getMessage() for r in caplog.records]).lower()
    assert "published" in text and len(caplog.records) > 10
    found = sorted(e for e in re.findall(r"[\w.+-]+@[\w-]+\.[\w.-]+", text) if e in emails)
    assert found == []


def test_unwritable_dead_letters_are_logged_without_their_payload(caplog):
    caplog.set_level(logging.ERROR)
    record = json.dumps({"user_id": "U1", "email": "Someone@Example.com"})
    streaming_refresh._log_unwritable({"table": "events", "step": "ParseMessages",
                                       "reason": "bad json", "record": record})
    (logged,) = caplog.records
    assert "events" in logged.getMessage() and "bad json" in logged.getMessage()
    assert "example.com" not in logged.getMessage().lower()
