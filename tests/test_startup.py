"""Start-up checks (#13): every refusal is one line on stderr, in seconds, with a distinct exit.

Each test runs a job's real entry point (``python -m pipelines.<job>``) and
checks the exit status (0 published, 1 gated, 2 usage or configuration error,
3 failure), that it failed quickly (before any data is processed) and that
stderr is ONE line naming the fix, never a traceback.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pipelines import batch_recommendations, jobs
from pipelines.jobs import EXIT_FAILED, EXIT_USAGE, UsageError, check_flags, option_classes
from transforms.warehouse import WarehouseLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Start-up refusals take 1.5-4 s on an idle laptop (most of it importing Beam);
# the bound leaves room for a loaded CI machine and is far below any run.
FAST_SECONDS = 30


def _job(module, *args, timeout=120):
    """Run ``python -m pipelines.<module> args``: (exit status, stdout, stderr, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"pipelines.{module}", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def _refused(module, *args, contains=()):
    """Assert that the job refuses at start-up with exit 2 and one line; returns that line."""
    code, out, err, seconds = _job(module, *args)
    lines = err.strip().splitlines()
    assert code == EXIT_USAGE, (code, err[-3000:])
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert seconds < FAST_SECONDS, seconds
    for text in contains:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(clean_world):
    return clean_world[0], clean_world[1]["as_of"]


def _batch(world_dir, as_of, tmp_path, *extra):
    return ["--input_dir", world_dir, "--warehouse", str(tmp_path / "wh.duckdb"),
            "--as_of", as_of, "--num_shards", "2", *extra]


# --------------------------------------------------------------------------- 1. flags

@pytest.mark.parametrize("flag, suggestion", [("--asof", "--as_of"),
                                              ("--input-dir", "--input_dir")])
def test_mistyped_flag_is_refused_with_a_suggestion(world, tmp_path, flag, suggestion):
    line = _refused("batch_recommendations", "--warehouse", tmp_path / "wh.duckdb",
                    flag, world[1], contains=(f"unknown flag {flag}",
                                              f"did you mean {suggestion}?"))
    assert line.startswith("error: ")
    assert not (tmp_path / "wh.duckdb").exists()  # nothing ran


@pytest.mark.parametrize("module, args, flag", [
    ("bandit_report", ["--window-days", "3"], "--window_days"),
    ("campaign_report", ["--report-html", "x.html"], "--report_html"),
    ("train_ranker", ["--ranker_cutoff", "3"], "--ranker_cutoffs"),
    ("evaluate_ranker", ["--ranker_artefact", "x"], "--ranker_artifact"),
    ("streaming_refresh", ["--window_second", "3"], "--window_seconds"),
    ("publish", ["prune", "--keep", "1", "--warehous", "x.duckdb"], "--warehouse"),
    ("backtest", ["--as_of", "2026-01-01T00:00:00Z", "--num-shards", "2"], "--num_shards"),
    ("generate_world", ["--sed", "3"], "--seed"),
])
def test_every_job_refuses_unknown_flags(module, args, flag):
    _refused(module, *args, contains=(f"did you mean {flag}?",))


def test_beam_options_and_values_are_checked_not_just_names():
    classes = option_classes(batch_recommendations)
    check_flags(["--runner", "DirectRunner", "--direct_num_workers=2", "--project", "p",
                 "--experiments=a", "--experiments", "b", "--input_dir", "x",
                 "--temp_location", "gs://b/t", "--sdk_container_image", "i"], classes)
    with pytest.raises(UsageError, match="--num_shards: invalid int value"):
        check_flags(["--num_shards", "two"], classes)
    with pytest.raises(UsageError, match="invalid choice"):
        check_flags(["--strategy", "segmnt"], classes)
    with pytest.raises(UsageError, match="unexpected argument 'extra'"):
        check_flags(["--input_dir", "x", "extra"], classes)
    with pytest.raises(UsageError, match="unknown flag --as;"):
        check_flags(["--as", "2026-01-01T00:00:00Z"], classes)  # no abbreviations


def test_every_template_parameter_is_a_known_flag():
    """Flex Template launches pass only parameters the job accepts."""
    from templates import metadata as md
    for template in md.TEMPLATES:
        module = __import__(f"pipelines.{template.job}", fromlist=["_"])
        parser = jobs.flag_parser(option_classes(module))
        known = {opt for action in parser._actions for opt in action.option_strings}
        with open(os.path.join(REPO, "templates", template.job, "metadata.json")) as handle:
            names = [p["name"] for p in json.load(handle)["parameters"]]
        assert names and all(f"--{name}" in known for name in names), template.job


# --------------------------------------------------------------------------- 2. times

@pytest.mark.parametrize("value", ["now", "03/02/2026", "2026-02-20T10:00:00", "2026"])
def test_as_of_must_be_rfc3339_with_an_offset(world, tmp_path, value):
    _refused("batch_recommendations", *_batch(world[0], value, tmp_path),
             contains=(f"--as_of {value!r} is not an RFC 3339 time", "explicit offset"))


@pytest.mark.parametrize("module", ["bandit_report", "train_ranker", "backtest"])
def test_other_jobs_refuse_a_loose_as_of(world, tmp_path, module):
    _refused(module, "--input_dir", world[0], "--warehouse", tmp_path / "wh.duckdb",
             "--as_of", "2026-02-20", contains=("--as_of '2026-02-20'",))


def test_events_window_times_are_strict_too(world, tmp_path):
    _refused("batch_recommendations", *_batch(world[0], world[1], tmp_path),
             "--source", "bigquery", "--bigquery_endpoint", f"http://127.0.0.1:{_free_port()}",
             "--events_since", "2026-02-01T00:00:00",
             contains=("--events_since '2026-02-01T00:00:00' is not an RFC 3339 time",))


# --------------------------------------------------------------------------- 3./4. inputs

def test_misspelt_segment_attribute_names_the_columns_and_the_closest(world, tmp_path):
    config = tmp_path / "shop.yaml"
    config.write_text("segment_attributes: [make, modle, year]\n")
    line = _refused("batch_recommendations", *_batch(world[0], world[1], tmp_path),
                    "--config", config)
    assert "segment attribute 'modle' is not a column of the users table" in line
    assert "email, make, model, updated_at, user_id, year" in line
    assert "did you mean 'model'?" in line


def test_fitment_attribute_missing_from_fitment_is_refused(world, tmp_path):
    shop = tmp_path / "shop"
    shutil.copytree(world[0], shop)
    with open(shop / "fitment.jsonl") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    with open(shop / "fitment.jsonl", "w") as handle:
        for row in rows:
            row["Model"] = row.pop("model")
            handle.write(json.dumps(row) + "\n")
    _refused("batch_recommendations", *_batch(str(shop), world[1], tmp_path),
             contains=("fitment attribute 'model' is not a column of the fitment table",
                       "did you mean 'Model'?"))


def test_missing_fitment_gives_the_config_hint(world, tmp_path):
    shop = tmp_path / "shop"
    shutil.copytree(world[0], shop)
    os.remove(shop / "fitment.jsonl")
    _refused("batch_recommendations", *_batch(str(shop), world[1], tmp_path),
             contains=(f"no fitment table in {shop} (fitment.jsonl/.jsonl.gz/.json/.parquet)",
                       "sets `fitment_attributes: []` in its --config"))
    # ...and following the hint passes the start-up checks.
    config = tmp_path / "nofit.yaml"
    config.write_text("fitment_attributes: []\n")
    options = jobs.job_options(_batch(str(shop), world[1], tmp_path, "--config", str(config)),
                               batch_recommendations.__name__)
    ctx = batch_recommendations.context_from(options)
    assert ctx.config.fitment_attributes == ()


@pytest.mark.parametrize("module, table", [("batch_recommendations", "users"),
                                           ("bandit_report", "treatment_events"),
                                           ("campaign_report", "events")])
def test_any_missing_table_is_one_line(world, tmp_path, module, table):
    shop = tmp_path / "shop"
    shutil.copytree(world[0], shop)
    os.remove(shop / f"{table}.jsonl")
    _refused(module, "--input_dir", shop, "--warehouse", tmp_path / "wh.duckdb",
             "--as_of", world[1], contains=(f"no {table} table in {shop}",))


# --------------------------------------------------------------------------- 5. warehouse

def test_truncated_warehouse_fails_at_start_up(world, tmp_path):
    warehouse = tmp_path / "wh.duckdb"
    warehouse.write_bytes(b"DUCK" * 100)
    _refused("batch_recommendations", *_batch(world[0], world[1], tmp_path),
             contains=("is not a readable DuckDB warehouse",))


def test_a_held_warehouse_names_its_holder(world, tmp_path):
    lock = WarehouseLock(str(tmp_path / "wh.duckdb"))
    lock.acquire({"job": "batch_recommendations", "run_id": "nightly_1", "pid": 4242,
                  "host": "etl-7", "started_at": "2026-03-01T06:00:00+00:00"})
    try:
        _refused("batch_recommendations", *_batch(world[0], world[1], tmp_path),
                 contains=("is in use by job batch_recommendations, run_id nightly_1, "
                           "pid 4242, host etl-7",))
        _refused("publish", "prune", "--keep", "1", "--warehouse", tmp_path / "wh.duckdb",
                 contains=("in use by",))
    finally:
        lock.release()
    with pytest.raises(UsageError, match="in use by job bandit_report"):
        with jobs.locked_warehouse(str(tmp_path / "wh.duckdb"), "bandit_report", "r1"):
            with jobs.locked_warehouse(str(tmp_path / "wh.duckdb"), "batch", "r2"):
                pass
    with jobs.locked_warehouse(str(tmp_path / "wh.duckdb"), "batch", "r3"):
        pass  # released on leaving the block


def test_a_killed_holder_releases_the_lock(tmp_path):
    path = str(tmp_path / "wh.duckdb")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from transforms.warehouse import WarehouseLock; "
        f"lock = WarehouseLock({path!r}); lock.acquire({{'job': 'x'}}); "
        "print('held', flush=True); "
        "time.sleep(60)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="in use by job x"):
            with jobs.locked_warehouse(path, "batch"):
                pass
        holder.kill()  # SIGKILL: no clean-up code runs; the OS drops the flock
        holder.wait(timeout=30)
        with jobs.locked_warehouse(path, "batch"):
            pass
    finally:
        holder.kill()
        holder.stdout.close()


def test_two_runs_on_one_warehouse(world, tmp_path):
    """The second run is refused at once saying who holds the warehouse; the first publishes."""
    warehouse = tmp_path / "wh.duckdb"
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.batch_recommendations",
         *_batch(world[0], world[1], tmp_path, "--run_id", "first_run")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock_file = str(warehouse) + ".lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                os.path.exists(lock_file) and "first_run" in open(lock_file).read()):
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        line = _refused("batch_recommendations",
                        *_batch(world[0], world[1], tmp_path, "--run_id", "second_run"),
                        contains=("in use by job batch_recommendations, run_id first_run",
                                  f"pid {first.pid}"))
        assert "second_run" not in line
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert "run first_run: PUBLISHED" in out
    assert open(str(warehouse) + ".lock").read() == ""  # released, holder cleared


# --------------------------------------------------------------------------- 6. endpoint

def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("module, args", [
    ("batch_recommendations", ["--source", "bigquery", "--sink", "bigquery",
                               "--bigquery_dataset", "recs"]),
    ("streaming_refresh", ["--events_subscription", "projects/test-project/subscriptions/events",
                           "--treatments_subscription", "projects/test-project/subscriptions/treat",
                           "--streaming_dataset", "test-project.recs"]),
    ("publish", ["list", "--bigquery_dataset", "recs"]),
])
def test_unreachable_bigquery_endpoint_fails_in_seconds(world, tmp_path, module, args):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    extra = [] if module == "publish" else ["--input_dir", world[0], "--as_of", world[1]]
    if module == "streaming_refresh":
        extra = ["--input_dir", world[0]]
    _refused(module, *args, *extra, "--bigquery_endpoint", endpoint,
             contains=(f"--bigquery_endpoint {endpoint} is unreachable",))


# --------------------------------------------------------------------------- 7. outputs

def test_report_html_naming_a_directory_is_refused_before_running(world, tmp_path):
    _refused("campaign_report", "--input_dir", world[0], "--warehouse", tmp_path / "wh.duckdb",
             "--as_of", world[1], "--report_html", tmp_path,
             contains=(f"--report_html '{tmp_path}' is a directory",))
    assert not (tmp_path / "wh.duckdb").exists()


def test_unwritable_staging_dir_is_refused(world, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused("batch_recommendations",
             *_batch(world[0], world[1], tmp_path, "--staging_dir", blocker / "staging"),
             contains=("--staging_dir: cannot create directory",))


def test_warehouse_in_an_unwritable_place_is_refused(world, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _refused("bandit_report", "--input_dir", world[0], "--as_of", world[1],
             "--warehouse", blocker / "wh.duckdb", contains=("--warehouse",))


# --------------------------------------------------------------------------- 8. exit codes

def test_bad_config_and_run_id_exit_2(world, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("rules: {recs_per_user: -1}\n")
    _refused("batch_recommendations", *_batch(world[0], world[1], tmp_path, "--config", config),
             contains=("--config",))
    _refused("batch_recommendations", *_batch(world[0], world[1], tmp_path, "--run_id", "../x"),
             contains=("--run_id '../x'",))


CRASH = """
import sys
from pipelines import batch_recommendations as job
from pipelines.jobs import entry_point

def build(*args, **kwargs):
    raise KeyError("make")  # what a bug deep in the graph looks like

job.build = build
sys.argv = ["batch_recommendations"] + sys.argv[1:]
entry_point(job.run)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_crash_exits_3_with_one_line_and_keeps_the_traceback(world, tmp_path, debug):
    proc = subprocess.run([sys.executable, "-c", CRASH, *_batch(world[0], world[1], tmp_path),
                           *(["--debug"] if debug else [])],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_FAILED, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: KeyError: 'make' (traceback in "), last
    saved = last.split("traceback in ", 1)[1].split(";", 1)[0]
    with open(saved) as handle:
        assert "in build" in handle.read()  # where it happened
    os.remove(saved)
    if debug:
        assert "Traceback (most recent call last)" in proc.stderr
    else:
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
    # the lock went with the crash: a later run can take the warehouse
    with jobs.locked_warehouse(str(tmp_path / "wh.duckdb"), "next"):
        pass


def test_exit_status_mapping(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the crash's traceback file
    def gated(argv):
        return 1

    def refused(argv):
        raise UsageError("--x is wrong\nreally")

    def old_style(argv):
        raise SystemExit("--y is wrong")

    def crashed(argv):
        raise ValueError("boom")

    assert jobs.run_with_status(gated, []) == 1
    assert jobs.run_with_status(refused, []) == 2
    assert jobs.run_with_status(old_style, []) == 2
    assert jobs.run_with_status(crashed, []) == 3
    assert len(list(tmp_path.glob("job-*.traceback"))) == 1
    assert jobs.run_with_status(lambda argv: "path", [], returns_status=False) == 0
    assert str(UsageError("a\n  b")) == "a b"  # always one line
