"""End to end (#14): the batch job with the default config (output unchanged) and with a slot mix.

Everything the assertions compare with is re-derived from the raw input files (the
world's events, catalogue and fitment) or from an independent implementation
(bench/batch.sql, the same scoring as one DuckDB script), never from the selection code.
"""
import importlib.util
import json
import os

import duckdb
import numpy as np
import pandas as pd
import pytest

from models.config import DEFAULT_CONFIG, REPURCHASE_SOURCES
from models.popularity import ORDER_EVENT_NAMES
from models.recommend import rec_columns
from pipelines import batch_recommendations
from transforms.io import read_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = DEFAULT_CONFIG.rules.recs_per_user
MIX = [["buy_again", 2], ["also_bought", 1], ["segment_popularity", 1]]


def _run(world_dir, tmp, as_of, name, *extra):
    warehouse = str(tmp / f"{name}.duckdb")
    code = batch_recommendations.run([
        "--input_dir", world_dir, "--warehouse", warehouse, "--as_of", as_of,
        "--num_shards", "4", "--run_id", name, *extra])
    with duckdb.connect(warehouse, read_only=True) as con:
        tables = {t: con.execute(f"SELECT * FROM {t}").df() for t in (
            "recommendations", "qa_checks", "pipeline_runs")}
    return code, tables


@pytest.fixture(scope="module")
def default_run(clean_world, tmp_path_factory):
    world_dir, manifest = clean_world
    return _run(world_dir, tmp_path_factory.mktemp("default"), manifest["as_of"], "default")


@pytest.fixture(scope="module")
def mix_run(clean_world, tmp_path_factory):
    world_dir, manifest = clean_world
    tmp = tmp_path_factory.mktemp("mix")
    config = tmp / "mix.yaml"
    config.write_text(json.dumps({"candidates": {"mix": MIX,
                                                 "also_bought": {"similarity": "count"}}}))
    return _run(world_dir, tmp, manifest["as_of"], "mix", "--config", str(config))


def _sql_recommendations(world_dir: str, as_of: str) -> pd.DataFrame:
    """bench/batch.sql (the job's scoring as one DuckDB script) on the same files."""
    spec = importlib.util.spec_from_file_location("bench_batch",
                                                  os.path.join(ROOT, "bench", "batch.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    con = duckdb.connect()
    con.execute("SET VARIABLE as_of = ?::TIMESTAMPTZ", [as_of])
    for view in bench.source_views(world_dir):
        con.execute(view)
    with open(bench.SQL_SCRIPT, encoding="utf-8") as handle:
        for statement in duckdb.extract_statements(handle.read()):
            con.execute(statement)
    return con.execute("SELECT * FROM sql_recommendations").df()


def _purchases(world_dir: str, as_of: str, days=None) -> set:
    """(user_id, sku) ordered at or before ``as_of`` (within ``days`` of it), from the raw file."""
    events, _ = read_frame(world_dir, "events")
    times = pd.to_datetime(events["event_time"], utc=True, format="ISO8601", errors="coerce")
    end = pd.Timestamp(as_of)
    keep = events["event_name"].isin(ORDER_EVENT_NAMES).to_numpy(bool) & (times <= end).to_numpy(
        bool)
    if days is not None:
        keep &= (times > end - pd.Timedelta(days=days)).to_numpy(bool)
    return set(zip(events.loc[keep, "user_id"], events.loc[keep, "sku"]))


def _long(recs: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({
        "user_id": recs["user_id"], "slot": i, "sku": recs[f"rec_part_{i}"],
        "source": recs[f"rec{i}_source"]}) for i in range(1, N + 1)], ignore_index=True)


# --- the default configuration: the output as it was before the mix ---------------------

def test_default_config_output_is_unchanged(default_run, clean_world):
    """Same columns as before #14, and every recommendation column equal to bench/batch.sql's
    (the SQL twin the job has agreed with row for row since before the mix existed)."""
    code, tables = default_run
    recs = tables["recommendations"]
    assert code == 0
    assert list(recs.columns) == rec_columns(N) + ["generated_at", "run_id", "model_version"]
    assert set(recs["model_version"]) == {batch_recommendations.MODEL_VERSION}
    assert sorted(tables["qa_checks"].loc[tables["qa_checks"]["rule_id"] < 100, "rule_id"]
                  ) == list(range(1, 16))
    world_dir, manifest = clean_world
    sql = _sql_recommendations(world_dir, manifest["as_of"])
    both = recs.merge(sql, on="user_id", suffixes=("", "_sql"), how="outer", indicator=True)
    assert (both["_merge"] == "both").all() and len(both) == len(recs) > 1000
    for i in range(1, N + 1):
        for field in (f"rec_part_{i}", f"rec{i}_part_type"):
            assert (both[field] == both[f"{field}_sql"]).all(), field
        for field in (f"rec{i}_score", f"rec{i}_price"):
            assert np.allclose(both[field], both[f"{field}_sql"], rtol=0, atol=1e-9), field
    assert (both["source"] == both["source_sql"]).all()
    assert (both["email_lower"] == both["email_lower_sql"]).all()


# --- a mix: buy-again 2 + also-bought 1 + segment popularity 1 ------------------------------

def test_mix_run_publishes_with_every_check_at_zero(mix_run):
    code, tables = mix_run
    assert code == 0
    assert tables["pipeline_runs"]["status"].tolist() == ["published"]
    qa = tables["qa_checks"]
    assert sorted(qa.loc[qa["rule_id"] < 100, "rule_id"]) == list(range(1, 17))  # + rule 16
    assert qa["violations"].sum() == 0
    assert set(tables["recommendations"]["model_version"]) == {
        batch_recommendations.MIX_MODEL_VERSION}


def test_mix_slots_follow_their_kind(mix_run, clean_world):
    """Buy-again slots hold SKUs the user bought; discovery slots none bought in 365 days."""
    _, tables = mix_run
    world_dir, manifest = clean_world
    recs = tables["recommendations"]
    long = _long(recs)
    assert set(long["source"]) == {"buy_again", "also_bought", "segment_popularity"}
    bought_ever = _purchases(world_dir, manifest["as_of"])
    recent = _purchases(world_dir, manifest["as_of"], DEFAULT_CONFIG.rules.exclusion_days)
    pairs = list(zip(long["user_id"], long["sku"]))
    repurchase = long["source"].isin(list(REPURCHASE_SOURCES)).to_numpy(bool)
    in_ever = np.array([p in bought_ever for p in pairs])
    in_recent = np.array([p in recent for p in pairs])
    assert repurchase.sum() > 50 and in_ever[repurchase].all()
    assert not in_recent[~repurchase].any()
    # The mix order holds: a buy-again slot never comes after a slot of a later source.
    rank = long["source"].map({"buy_again": 0, "also_bought": 1, "segment_popularity": 2})
    order = rank.to_numpy().reshape(N, -1).T  # users × slots
    assert (np.diff(order, axis=1) >= 0).all()
    # Distinct SKUs, the part-type cap over the whole list, and fitment, from the raw files.
    assert all(len(set(r)) == N for r in recs[[f"rec_part_{i}" for i in range(1, N + 1)]]
               .to_numpy(object))
    types = recs[[f"rec{i}_part_type" for i in range(1, N + 1)]].to_numpy(object)
    assert max(pd.Series(row).value_counts().max() for row in types) <= (
        DEFAULT_CONFIG.rules.max_per_part_type)
    fitment, _ = read_frame(world_dir, "fitment")
    catalog, _ = read_frame(world_dir, "catalog")
    universal = set(catalog.loc[catalog["is_universal"].fillna(False).astype(bool), "sku"])
    fits = set(zip(fitment["sku"], fitment["make"], fitment["model"],
                   fitment["year"].astype("Int64")))
    for row in recs.itertuples(index=False):
        for i in range(1, N + 1):
            sku = getattr(row, f"rec_part_{i}")
            assert sku in universal or (sku, row.make, row.model, row.year) in fits


def test_mix_counts_per_source_in_pipeline_runs(mix_run):
    _, tables = mix_run
    counters = json.loads(tables["pipeline_runs"]["counters"].iloc[0])
    long = _long(tables["recommendations"])
    observed = long["source"].value_counts().to_dict()
    assert {k.split("slots.source.", 1)[1]: v for k, v in counters.items()
            if k.startswith("slots.source.")} == observed
    assert sum(observed.values()) == N * len(tables["recommendations"])
    assert counters["candidates.similarity.pairs_kept"] > 0
    assert counters["candidates.buy_again.rows"] > 0


# --- the adapter alone (TestPipeline) ----------------------------------------------------------

def test_source_candidates_adapter_matches_the_pure_functions():
    """Order lines spread over several frames (as JoinUsersWithEvents emits them, one per user
    shard) give the same per-user candidates and shared tables as the functions on all lines."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from models import candidates
    from models.config import CandidatesConfig, RecsConfig
    from transforms.recommend import SourceCandidates

    as_of = pd.Timestamp("2026-03-01", tz="UTC")
    config = RecsConfig(candidates=CandidatesConfig(
        mix=(("buy_again", 1), ("also_bought", 1), ("trending", 1),
             ("segment_popularity", 1))))
    rows = []
    for u in range(12):
        for d, sku in ((40, "A"), (20, "B"), (3, "C" if u % 2 else "A")):
            rows.append((f"u{u}", f"o{u}-{d}", sku, as_of - pd.Timedelta(days=d)))
    lines = pd.DataFrame(rows, columns=["user_id", "order_id", "sku", "event_time"])
    lines["make"], lines["model"], lines["year"] = "Ford", "Mustang", 2015
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(12)], "make": "Ford",
                          "model": "Mustang", "year": 2015, "bought": [()] * 12})
    tables = candidates.shared_tables(lines, as_of, config.candidates)
    assert tables.trending["sku"].tolist() == ["B", "C"]  # 12 and 6 recent orders, none before
    expected = candidates.personal_candidates(lines, users["user_id"], as_of,
                                              config.candidates, tables, 32)
    assert set(expected["source"]) == {"buy_again", "also_bought", candidates.PURCHASED}
    key = lambda f: sorted(zip(f["user_id"], f["sku"], f["source"], f["score"].round(9)))
    with TestPipeline() as p:
        frames = p | "Lines" >> beam.Create([lines.iloc[:10], lines.iloc[10:25], lines.iloc[25:]])
        people = p | "Users" >> beam.Create([users])
        personal, shared, (counts, build) = ({"users": people, "lines": frames}
                                             | SourceCandidates(as_of, config, 3))
        got = (personal | beam.combiners.ToList()
               | beam.Map(lambda fs: key(pd.concat(fs, ignore_index=True))))
        assert_that(got, equal_to([key(expected)]))
        trend = shared | beam.Map(lambda t: t.trending["sku"].tolist())
        assert_that(trend, equal_to([tables.trending["sku"].tolist()]), label="Trending")
        assert_that(build | beam.Map(lambda kv: kv[0]).with_output_types(str)
                    | beam.combiners.Count.PerElement() | beam.Keys(),
                    lambda names: _has(names, "candidates.similarity.pairs_kept",
                                       "candidates.trending.skus"), label="Counters")


def _has(names, *wanted):
    missing = set(wanted) - set(names)
    assert not missing, missing


def test_ranker_with_a_mix_is_refused_at_start_up(clean_world, tmp_path):
    from pipelines.jobs import UsageError
    world_dir, manifest = clean_world
    config = tmp_path / "mix.yaml"
    config.write_text(json.dumps({"candidates": {"mix": MIX}}))
    # A popularity ranker's artifact with a mix: refused before any work (#14: only a union
    # ranker trained on the mix's sources may serve a mix; tests/test_union_ranker.py).
    from models.features import feature_names
    from models.ranker import LogisticParams, RankerModel
    from transforms.ranker import save_model
    names = feature_names(DEFAULT_CONFIG)
    params = LogisticParams(np.zeros(len(names)), np.ones(len(names)), np.zeros(len(names)), 0.0)
    model_path = save_model(RankerModel("logistic", "binary", names, params,
                                        metadata={"version": "pop"}), str(tmp_path / "m"))
    with pytest.raises(UsageError, match="needs a union ranker trained on its sources"):
        batch_recommendations.run([
            "--input_dir", world_dir, "--warehouse", str(tmp_path / "w.duckdb"),
            "--as_of", manifest["as_of"], "--config", str(config),
            "--ranker_model", model_path])
