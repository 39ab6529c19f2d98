"""End to end: the batch job on a generated world, read back from the warehouse."""
import json
import os
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest

from models import recommend
from models.config import DEFAULT_CONFIG
from models.health import RECONCILED_TABLES, reconcile
from pipelines import batch_recommendations, generate_world
from transforms.io import read_frame

N = DEFAULT_CONFIG.rules.recs_per_user
REC_COLUMNS = [f"rec_part_{i}" for i in range(1, N + 1)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    generate_world.main(["--preset", "tiny", "--seed", "11", "--out", out, "--bad_rows", "3"])
    with open(os.path.join(out, "world.json")) as handle:
        manifest = json.load(handle)
    return out, manifest


def _run(world_dir, warehouse, as_of, *extra):
    return batch_recommendations.run([
        "--input_dir", world_dir, "--warehouse", warehouse, "--as_of", as_of,
        "--num_shards", "4", *extra])


@pytest.fixture(scope="module")
def published(world, tmp_path_factory):
    world_dir, manifest = world
    warehouse = str(tmp_path_factory.mktemp("wh") / "warehouse.duckdb")
    code = _run(world_dir, warehouse, manifest["as_of"], "--run_id", "first")
    con = duckdb.connect(warehouse, read_only=True)
    tables = {t: con.execute(f"SELECT * FROM {t}").df() for t in (
        "recommendations", "qa_checks", "pipeline_runs", "dead_letter")}
    con.close()
    return code, tables, warehouse


def test_run_publishes_with_zero_qa_violations(published):
    code, tables, _ = published
    assert code == 0
    assert (tables["qa_checks"]["rule_id"] <= 15).sum() == 15  # the rules, then 7 sanity gates
    assert (tables["qa_checks"]["rule_id"] > 100).sum() == 7
    assert tables["qa_checks"]["violations"].sum() == 0
    assert tables["pipeline_runs"]["status"].tolist() == ["published"]


def test_one_row_per_lowercase_email_with_distinct_fitting_skus(published, world):
    _, tables, _ = published
    recs = tables["recommendations"]
    assert len(recs) > 1000
    assert recs["email_lower"].is_unique
    assert (recs["email_lower"] == recs["email_lower"].str.lower()).all()
    skus = recs[REC_COLUMNS].to_numpy(object)
    assert all(len(set(row)) == N for row in skus)
    # Fitment re-derived from the raw input, independently of the job.
    fitment, _ = read_frame(world[0], "fitment")
    catalog, _ = read_frame(world[0], "catalog")
    universal = set(catalog.loc[catalog["is_universal"], "sku"])
    fits = set(zip(fitment["sku"], fitment["make"], fitment["model"],
                   fitment["year"].astype("Int64")))
    for row in recs.itertuples(index=False):
        for sku in (getattr(row, c) for c in REC_COLUMNS):
            assert sku in universal or (sku, row.make, row.model, row.year) in fits


def test_every_user_is_accounted_for(published, world):
    _, tables, _ = published
    counters = json.loads(tables["pipeline_runs"]["counters"].iloc[0])
    for table, figures in reconcile(counters).items():
        assert figures["read"] > 0, table
        assert figures["unexplained"] == 0, (table, figures)
    users, _ = read_frame(world[0], "users")
    assert counters["users.read"] >= len(users)
    assert counters["users.processed"] == len(tables["recommendations"])
    assert set(RECONCILED_TABLES) <= set(reconcile(counters))


def test_planted_bad_rows_are_dead_lettered_with_reasons(published, world):
    _, tables, _ = published
    reasons = set(tables["dead_letter"]["reason"])
    expected = {"malformed JSON", "unknown event_name", "negative price", "non-finite price",
                "unknown sku"}
    assert expected <= reasons, expected - reasons
    assert any(r.startswith("missing ") for r in reasons)
    assert tables["dead_letter"]["record"].notna().all()


def test_conflicting_catalogue_rows_are_resolved_and_reported(published, world):
    _, tables, _ = published
    _, manifest = world
    conflicts = tables["dead_letter"].query("step == 'ResolveCatalogConflicts'")
    assert len(conflicts) == manifest["conflicting_catalog_skus"]
    assert conflicts["reason"].str.startswith("catalogue conflict").all()


def test_rerun_with_same_as_of_gives_same_recommendations(published, world, tmp_path):
    _, tables, _ = published
    world_dir, manifest = world
    warehouse = str(tmp_path / "again.duckdb")
    assert _run(world_dir, warehouse, manifest["as_of"], "--run_id", "again") == 0
    with duckdb.connect(warehouse, read_only=True) as con:
        again = con.execute("SELECT * FROM recommendations").df()
    columns = ["user_id"] + REC_COLUMNS + ["source"]
    first = tables["recommendations"][columns].sort_values("user_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, again[columns].sort_values("user_id")
                                  .reset_index(drop=True))


def test_a_planted_selection_bug_is_caught_and_not_published(published, world, tmp_path,
                                                             monkeypatch):
    """A selection bug that repeats one SKU must be caught by QA rule 9 and gated."""
    world_dir, manifest = world
    warehouse = str(tmp_path / "gated.duckdb")
    shutil.copy(published[2], warehouse)
    with duckdb.connect(warehouse, read_only=True) as con:
        before = con.execute("SELECT * FROM recommendations ORDER BY user_id").df()

    def repeat_best(order, part_type, variant_key, n, max_per_type):
        return [int(order[0])] * n

    monkeypatch.setattr(recommend, "greedy_pick", repeat_best)
    code = _run(world_dir, warehouse, manifest["as_of"], "--run_id", "buggy")
    assert code == 1
    with duckdb.connect(warehouse, read_only=True) as con:
        after = con.execute("SELECT * FROM recommendations ORDER BY user_id").df()
        qa = con.execute("SELECT rule_id, violations FROM qa_checks WHERE run_id = 'buggy'"
                         ).df().set_index("rule_id")["violations"]
        status = con.execute("SELECT status, message FROM pipeline_runs "
                             "WHERE run_id = 'buggy'").fetchone()
    assert qa[9] > 0
    assert status[0] == "gated" and "QA failed" in status[1]
    pd.testing.assert_frame_equal(before, after)


def test_fallback_levels_are_used(published):
    _, tables, _ = published
    shares = tables["recommendations"]["source"].value_counts(normalize=True)
    assert shares.idxmax() == "make+model+year"  # the most specific level serves most users
    assert set(shares.index) <= {"make+model+year", "make+model", "make", "global"}
    assert len(shares) >= 2  # thin vehicles really fall back
    assert np.isfinite(tables["recommendations"][[f"rec{i}_score" for i in range(1, N + 1)]]
                       .to_numpy(float)).all()
