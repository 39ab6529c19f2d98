"""Every job answers ``python -m pipelines.<job> --help`` with its own flags."""
import subprocess
import sys

import pytest

JOBS = {
    "batch_recommendations": ["--input_dir", "--as_of", "--config", "--strategy",
                              "--bigquery_endpoint", "--sink", "--serving_store"],
    "backtest": ["--input_dir", "--as_of", "--config"],
    "bandit_report": ["--window_days", "--exploration_floor", "--warehouse"],
    "campaign_report": ["--attribution_days", "--report_html"],
    "generate_world": ["--preset", "--seed", "--format", "--bad_rows"],
    "import_dataset": ["--source", "--out"],
    "publish": ["rollback", "prune"],
    "serve": ["run", "rebuild", "status"],
    "status": ["--warehouse", "--verify", "--template_spec", "--html", "--now"],
    "train_ranker": ["--ranker_model_dir", "--ranker_objective", "--as_of"],
    "evaluate_ranker": ["--ranker_artifact", "--as_of"],
    "tune": ["--grid", "--periods", "--as_of", "--confirm_on_holdout"],
    "streaming_refresh": ["--events_subscription", "--window_seconds",
                          "--allowed_lateness_seconds", "--bigquery_endpoint",
                          "--serving_store"],
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_lists_the_jobs_flags(job):
    proc = subprocess.run([sys.executable, "-m", f"pipelines.{job}", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in JOBS[job]:
        assert flag in proc.stdout, (job, flag)


BEAM_JOBS = ["batch_recommendations", "bandit_report", "campaign_report", "train_ranker",
             "evaluate_ranker", "streaming_refresh"]


@pytest.mark.parametrize("job", BEAM_JOBS)
def test_help_states_the_exit_statuses_and_the_flag_rule(job):
    proc = subprocess.run([sys.executable, "-m", f"pipelines.{job}", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert "any other flag is refused" in text
    assert "0 published (or done), 1 gated, 2 usage or configuration error, 3 failure" in text


def test_every_flag_is_declared_by_one_option_class_across_all_jobs():
    """Beam parses every PipelineOptions subclass imported in a process, so a flag two jobs'
    classes both declare breaks any process importing both (the backtest runs the batch job
    beside the others): every job imported at once must still parse its options."""
    code = ("import importlib, pkgutil, pipelines\n"
            "for m in pkgutil.iter_modules(pipelines.__path__):\n"
            "    importlib.import_module('pipelines.' + m.name)\n"
            "from apache_beam.options.pipeline_options import PipelineOptions\n"
            "print(sorted(PipelineOptions([]).get_all_options())[:1])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
