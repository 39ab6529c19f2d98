"""Schedules, alerts and the test image as code (#19), checked against a stub ``gcloud``.

``templates/deploy.sh schedules`` and ``alerts`` run ``templates/ops.py`` with a
stub gcloud on the PATH that logs every call (and the files it is handed) and
answers the ``list`` calls from the environment, like tests/test_templates.py
does for the image and template steps.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from models.config import DEFAULT_CONFIG
from models.status import run_health_line
from templates import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "templates", "deploy.sh")

STUB = r'''#!{python}
import json, os, sys
args = sys.argv[1:]
files = {{}}
for a in args:
    for flag in ("--message-body-from-file=", "--config-from-file=", "--policy-from-file="):
        if a.startswith(flag):
            files[flag.strip("-=")] = json.load(open(a[len(flag):]))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"args": ["gcloud", *args], "files": files}}) + "\n")
if args[-1:] == ["--format=json"] and "list" in args:
    key = {{"scheduler": "FAKE_JOBS", "logging": "FAKE_METRICS", "monitoring": "FAKE_POLICIES"}}
    print(os.environ.get(key[args[0]], "[]"))
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in args:
    print("ERROR: (gcloud) PERMISSION_DENIED", file=sys.stderr)
    sys.exit(1)
'''


@pytest.fixture
def deploy(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(STUB.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "calls.jsonl"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("FAKE_", "ALERT_", "RECS_", "INPUT_DIR", "SCHEDULER_",
                                 "DEAD_LETTER", "STALE_"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
                PROJECT_ID="demo-project", REGION="europe-west1", BUCKET="demo-bucket",
                PYTHON=sys.executable)

    def run(*args, **env):
        log.write_text("")
        proc = subprocess.run(["bash", DEPLOY, *args], env=dict(base, **env), cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        return proc, [json.loads(line) for line in log.read_text().splitlines()]

    return run


def _schedule_files():
    return sorted(f for f in os.listdir(os.path.join(REPO, "templates", "schedules")))


def test_schedules_create_one_scheduler_job_per_file_launching_its_template(deploy):
    proc, calls = deploy("schedules")
    assert proc.returncode == 0, proc.stderr
    assert calls[0]["args"][1:4] == ["scheduler", "jobs", "list"]
    creates = [c for c in calls if c["args"][1:5] == ["scheduler", "jobs", "create", "http"]]
    assert len(creates) == len(_schedule_files()) == 4
    by_name = {c["args"][5]: c for c in creates}
    assert set(by_name) == {"segment-recs-daily-batch", "segment-recs-weekly-ranker-retrain",
                            "segment-recs-daily-campaign-report",
                            "segment-recs-daily-bandit-report"}
    daily = by_name["segment-recs-daily-batch"]
    assert "--schedule=0 5 * * *" in daily["args"] and "--time-zone=Etc/UTC" in daily["args"]
    assert ("--uri=https://dataflow.googleapis.com/v1b3/projects/demo-project/locations/"
            "europe-west1/flexTemplates:launch") in daily["args"]
    assert "--http-method=POST" in daily["args"]
    assert ("--oauth-service-account-email=dataflow-launcher@demo-project.iam."
            "gserviceaccount.com") in daily["args"]
    launch = daily["files"]["message-body-from-file"]["launchParameter"]
    assert launch["containerSpecGcsPath"] == (
        "gs://demo-bucket/templates/batch_recommendations/latest.json")
    assert launch["parameters"] == {"source": "bigquery", "sink": "bigquery",
                                    "bigquery_project": "demo-project",
                                    "bigquery_dataset": "recs"}
    weekly = by_name["segment-recs-weekly-ranker-retrain"]
    assert "--schedule=0 2 * * 1" in weekly["args"]
    body = weekly["files"]["message-body-from-file"]["launchParameter"]
    assert body["containerSpecGcsPath"].endswith("/templates/train_ranker/latest.json")
    assert body["parameters"] == {"input_dir": "gs://demo-bucket/input",
                                  "ranker_model_dir": "gs://demo-bucket/models/ranker"}


def test_schedules_update_existing_jobs_instead_of_duplicating(deploy):
    existing = json.dumps([{"name": "projects/demo-project/locations/europe-west1/jobs/"
                                    "segment-recs-daily-batch"}])
    proc, calls = deploy("schedules", FAKE_JOBS=existing, RECS_DATASET="shop_recs")
    assert proc.returncode == 0, proc.stderr
    verbs = {c["args"][5]: c["args"][3] for c in calls if c["args"][2:3] == ["jobs"]
             and c["args"][3] in ("create", "update")}
    assert verbs["segment-recs-daily-batch"] == "update"
    assert list(verbs.values()).count("create") == 3
    update = next(c for c in calls if c["args"][3:4] == ["update"])
    assert "--update-headers=Content-Type=application/json" in update["args"]
    assert update["files"]["message-body-from-file"]["launchParameter"]["parameters"][
        "bigquery_dataset"] == "shop_recs"


def test_a_schedule_with_a_bad_parameter_is_refused_before_any_call(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "template": "batch_recommendations",
                               "schedule": "0 5 * * *",
                               "parameters": {"as_of": "yesterday"}}))
    env = ops.environment({"PROJECT_ID": "p-project", "REGION": "r", "BUCKET": "b"})
    with pytest.raises(ops.OpsError, match="as_of='yesterday' does not match"):
        ops.schedule_request(str(bad), env)
    bad.write_text(json.dumps({"name": "x", "template": "batch_recommendations",
                               "schedule": "daily", "parameters": {"no_such_flag": "1"}}))
    with pytest.raises(ops.OpsError, match="not a 5-field cron line"):
        ops.schedule_request(str(bad), env)
    bad.write_text(json.dumps({"name": "x", "template": "batch_recommendations",
                               "schedule": "0 5 * * *", "parameters": {"no_such_flag": "1"}}))
    with pytest.raises(ops.OpsError, match="has no parameter 'no_such_flag'"):
        ops.schedule_request(str(bad), env)
    bad.write_text(json.dumps({"name": "x", "template": "nope", "schedule": "0 5 * * *"}))
    with pytest.raises(ops.OpsError, match="no template 'nope'"):
        ops.schedule_request(str(bad), env)


def test_the_committed_files_render_offline():
    proc = subprocess.run([sys.executable, "-m", "templates.ops", "check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("PROJECT_ID", "REGION", "BUCKET")})
    assert proc.returncode == 0, proc.stderr


def test_alerts_create_metrics_then_policies_with_channels(deploy):
    channels = "projects/demo-project/notificationChannels/42"
    proc, calls = deploy("alerts", ALERT_CHANNELS=channels)
    assert proc.returncode == 0, proc.stderr
    metrics = {c["args"][4]: c["files"]["config-from-file"] for c in calls
               if c["args"][1:4] == ["logging", "metrics", "create"]}
    assert set(metrics) == {"segment_recs_runs_published", "segment_recs_runs_gated",
                            "segment_recs_zero_output", "segment_recs_dead_letter_share",
                            "segment_recs_retrain_recommended"}
    policies = {c["files"]["policy-from-file"]["displayName"]: c["files"]["policy-from-file"]
                for c in calls if c["args"][1:4] == ["monitoring", "policies", "create"]}
    assert set(policies) == {"segment-recs: batch run gated",
                             "segment-recs: zero recommendations written",
                             "segment-recs: published table is stale",
                             "segment-recs: dead letters above threshold",
                             "segment-recs: ranker drift, retrain recommended"}
    first_policy = next(i for i, c in enumerate(calls) if c["args"][1] == "monitoring"
                        and c["args"][3] == "create")
    last_metric = max(i for i, c in enumerate(calls) if c["args"][1] == "logging"
                      and c["args"][3] == "create")
    assert last_metric < first_policy  # a policy may only name an existing metric
    for title, policy in policies.items():
        assert policy["notificationChannels"] == [channels], title
        assert "docs/operations.md" in policy["documentation"]["content"]
        for condition in policy["conditions"]:
            spec = condition.get("conditionThreshold") or condition.get("conditionAbsent")
            metric = re.search(r'logging.googleapis.com/user/(\w+)', spec["filter"])[1]
            assert metric in metrics, (title, metric)
    dead = policies["segment-recs: dead letters above threshold"]["conditions"][0]
    assert float(dead["conditionThreshold"]["thresholdValue"]) == (
        DEFAULT_CONFIG.status.max_dead_letter_share)
    stale = policies["segment-recs: published table is stale"]["conditions"][0][
        "conditionThreshold"]
    window = int(stale["aggregations"][0]["alignmentPeriod"].rstrip("s"))
    grace = int(stale["duration"].rstrip("s"))
    assert (window + grace) / 3600 == DEFAULT_CONFIG.status.max_published_age_hours
    assert stale["evaluationMissingData"] == "EVALUATION_MISSING_DATA_ACTIVE"


def test_alerts_update_what_exists_and_a_gcloud_failure_stops_the_step(deploy):
    proc, calls = deploy(
        "alerts", FAKE_METRICS=json.dumps([{"name": "segment_recs_runs_gated"}]),
        FAKE_POLICIES=json.dumps([{"name": "projects/demo-project/alertPolicies/7",
                                   "displayName": "segment-recs: batch run gated"}]))
    assert proc.returncode == 0, proc.stderr
    assert any(c["args"][1:5] == ["logging", "metrics", "update", "segment_recs_runs_gated"]
               for c in calls)
    assert any(c["args"][1:5] == ["monitoring", "policies", "update",
                                  "projects/demo-project/alertPolicies/7"] for c in calls)
    assert "notify no one" in proc.stdout
    proc, calls = deploy("alerts", FAKE_FAIL="segment_recs_runs_gated")
    assert proc.returncode == 1 and "PERMISSION_DENIED" in proc.stderr
    assert not any(c["args"][1] == "monitoring" and c["args"][2:3] == ["policies"]
                   and c["args"][3] != "list" for c in calls)


def test_schedules_and_alerts_need_the_project_first(deploy):
    proc, calls = deploy("schedules", BUCKET="")
    assert proc.returncode == 1 and "set BUCKET" in proc.stderr and calls == []


def _metric_regex(name):
    path = os.path.join(REPO, "templates", "alerts", "metrics",
                        name.replace("segment_recs_", "") + ".json")
    with open(path) as handle:
        metric = json.load(handle)
    return metric, re.search(r'jsonPayload.message=~"(.*)"$', metric["filter"])[1]


@pytest.mark.parametrize("row, matches", [
    ({"status": "published", "recommendations_written": 1485, "dead_lettered": 9},
     {"segment_recs_runs_published"}),
    ({"status": "gated", "recommendations_written": 1400, "dead_lettered": 9},
     {"segment_recs_runs_gated"}),
    ({"status": "gated", "recommendations_written": 0, "dead_lettered": 1494},
     {"segment_recs_runs_gated", "segment_recs_zero_output"}),
    ({"status": "published", "recommendations_written": 10, "dead_lettered": 0,
      "counters": json.dumps({"ranker.retrain_recommended": 1, "users.read": 10})},
     {"segment_recs_runs_published", "segment_recs_retrain_recommended"}),
])
def test_the_metric_filters_match_the_run_health_line(row, matches):
    line = run_health_line({"job": "batch_recommendations", "run_id": "r1",
                            "counters": json.dumps({"users.read": 1500}), **row})
    names = ("segment_recs_runs_published", "segment_recs_runs_gated",
             "segment_recs_zero_output", "segment_recs_retrain_recommended")
    assert {n for n in names if re.search(_metric_regex(n)[1], line)} == matches
    metric, selects = _metric_regex("segment_recs_dead_letter_share")
    assert re.search(selects, line)
    extract = re.search(r'REGEXP_EXTRACT\(jsonPayload.message, "(.*)"\)',
                        metric["valueExtractor"])[1]
    share = float(re.search(extract, line)[1])
    read = 10 if "ranker" in row.get("counters", "") else 1500
    assert share == pytest.approx(row["dead_lettered"] / read, abs=1e-6)


def test_the_test_image_has_what_the_suite_needs():
    with open(os.path.join(REPO, "templates", "test", "Dockerfile")) as handle:
        text = handle.read()
    base = re.search(r"^FROM (\S+)", text, re.M)[1]
    assert base.startswith("gcr.io/google.com/cloudsdktool/google-cloud-cli:")
    assert base.endswith("-emulators")  # gcloud with the Pub/Sub emulator
    for package in ("python3-venv", "default-jre-headless", "redis-server", "libgomp1"):
        assert package in text, package
    assert '"/deps[test]"' in text and "sys.version_info[:2] == (3, 11)" in text


def test_a_missing_emulator_stops_the_suite_with_one_line(tmp_path):
    """tests/conftest.py: no gcloud/java on PATH -> one line and exit 4, no test runs."""
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_streaming_e2e.py", "tests/test_status_deploy.py"],
                          cwd=REPO, env=dict(os.environ, PATH=str(empty)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stdout[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "unavailable" in line]
    assert len(lines) == 1 and "Pub/Sub emulator unavailable (gcloud is not on PATH)" in lines[0]
    assert "test_streaming_e2e.py" in lines[0] and "install:" in lines[0]
    assert " passed" not in proc.stdout and " failed" not in proc.stdout


def test_only_modules_that_start_an_emulator_need_it(monkeypatch):
    from tests import conftest
    monkeypatch.setenv("PATH", "")
    need = conftest.missing_components({"a.py": "with pubsub_emulator() as emu:",
                                        "b.py": "def test_x(tmp_path): pass"})
    assert len(need) == 1 and "a.py need it" in need[0]
    assert conftest.missing_components({"b.py": "def test_x(tmp_path): pass"}) == []


def test_with_xdist_the_controller_stops_before_any_worker_crashes(tmp_path):
    """Cloud Build runs the suite with -n 2: the same one message, no INTERNALERROR."""
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-n", "2", "tests/test_streaming_e2e.py"],
                          cwd=REPO, env=dict(os.environ, PATH=str(empty)),
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 4, text[-2000:]
    assert "Pub/Sub emulator unavailable (gcloud is not on PATH)" in text
    assert "INTERNALERROR" not in text and "Traceback" not in text
