"""Tests for models.world: each realism property of the synthetic world holds (tiny preset),
generation is deterministic and fast, and written files round-trip."""
import math
import re
import time

import numpy as np
import orjson
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from models import world as W
from models.world import WorldSpec, generate, write_world
from pipelines import generate_world

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
ORDER_NAMES = ("Placed Order", "Ordered Product", "Consumer Website Order")


@pytest.fixture(scope="module")
def world():
    return generate(WorldSpec.preset("tiny"), 7)


@pytest.fixture(scope="module")
def order_lines(world):
    """Distinct (order, sku) purchase lines of history and holdout, with the buyer's segment."""
    events = pd.concat([world.events, world.holdout_events]).drop_duplicates("event_id")
    lines = events[events["event_name"] == "Placed Order"].copy()
    segments = world.truth.segments.set_index(["make", "model", "year"])["segment_id"]
    users = world.users.dropna(subset=["make"])
    key = pd.MultiIndex.from_arrays([users["make"], users["model"], users["year"].astype(int)])
    user_segment = pd.Series(segments.reindex(key).to_numpy(), index=users["user_id"])
    lines["segment_id"] = user_segment.reindex(lines["user_id"]).to_numpy()
    return lines


def _records(frame: pd.DataFrame) -> list:
    """Rows as plain Python values (None for missing, lists for tags) for comparisons."""
    out = {}
    for column in frame.columns:
        values = frame[column].astype(object)
        out[column] = [None if not isinstance(v, (list, np.ndarray)) and pd.isna(v)
                       else list(v) if isinstance(v, (list, np.ndarray))
                       else v.item() if isinstance(v, np.generic) else v for v in values]
    return [dict(zip(out, row)) for row in zip(*out.values())]


# ----------------------------------------------------------------------------- basics

def test_tiny_generates_in_under_three_seconds():
    started = time.perf_counter()
    generate(WorldSpec.preset("tiny"), 11)
    assert time.perf_counter() - started < 3.0


def test_same_seed_same_world_and_other_seed_differs(world):
    again = generate(WorldSpec.preset("tiny"), 7)
    for name, frame in world.tables().items():
        pd.testing.assert_frame_equal(frame, again.tables()[name])
    assert again.manifest == world.manifest
    other = generate(WorldSpec.preset("tiny"), 8)
    assert not other.events.head(100).equals(world.events.head(100))


def test_presets_scale_and_unknown_preset_fails():
    tiny, demo, full = (WorldSpec.preset(p) for p in ("tiny", "demo", "full"))
    assert tiny.n_users < demo.n_users < full.n_users == 500_000
    assert full.n_segments == 1_100 and full.n_skus == 25_000
    with pytest.raises(ValueError):
        WorldSpec.preset("huge")


def test_contract_fields_and_types(world):
    assert list(world.catalog.columns) == ["sku", "title", "part_type", "brand", "price",
                                           "image_url", "tags", "is_universal", "variant_group"]
    assert list(world.fitment.columns) == ["sku", "make", "model", "year"]
    assert list(world.users.columns) == ["user_id", "email", "make", "model", "year",
                                         "updated_at"]
    for events in (world.events, world.holdout_events):
        assert list(events.columns) == ["event_id", "event_time", "user_id", "event_name", "sku",
                                        "quantity", "price", "order_id"]
        assert set(events["event_name"]) == set(W.EVENT_NAMES)
        is_order = events["event_name"].isin(ORDER_NAMES)
        assert events.loc[is_order, "order_id"].notna().all()
        assert events.loc[~is_order, "order_id"].isna().all()
        assert events["event_time"].str.match(RFC3339).all()
        assert (events["quantity"] >= 1).all()
        assert set(events["sku"]) <= set(world.catalog["sku"])
        assert set(events["user_id"]) <= set(world.users["user_id"])
    assert list(world.treatment_events.columns) == ["event_id", "event_time", "user_id",
                                                    "treatment_id", "campaign_id", "kind",
                                                    "reason", "propensity",
                                                    "allocation_version"]
    # Each SENT records its treatment's logging probability (the world's fixed weights).
    te = world.treatment_events
    sent = te["kind"] == "SENT"
    weights = te.loc[sent, "treatment_id"].map(world.truth.treatment_weights)
    assert np.allclose(te.loc[sent, "propensity"], weights, atol=1e-6)
    assert te.loc[~sent, "propensity"].isna().all()
    assert te.loc[~sent, "allocation_version"].isna().all()
    assert (te.loc[sent, "allocation_version"] == W.ALLOCATION_VERSION).all()
    assert world.users["updated_at"].str.match(RFC3339).all()
    assert world.users["user_id"].str.match(r"^U\d{7}$").all()
    assert all(isinstance(t, list) for t in world.catalog["tags"])


def test_manifest_windows_counts_and_anomalies(world):
    m = world.manifest
    assert m["as_of"] == world.events["event_time"].max()
    assert m["history_start"] <= world.events["event_time"].min()
    assert m["as_of"] < m["holdout_start"] <= world.holdout_events["event_time"].min()
    assert world.holdout_events["event_time"].max() < m["holdout_end"]
    span = pd.Timestamp(m["holdout_end"]) - pd.Timestamp(m["holdout_start"])
    assert span == pd.Timedelta(days=28)
    for name, frame in world.tables().items():
        assert m["row_counts"][name] == len(frame)
    for key in ("conflicting_catalog_skus", "duplicate_event_ids", "duplicate_emails",
                "thin_vehicles", "bad_rows_by_kind", "null_vehicle_users", "http_image_urls",
                "refurbished_skus", "service_skus", "variant_groups", "specialised_variants"):
        assert key in m
    orjson.dumps(m)


# ----------------------------------------------------------------------------- vehicles, users

def test_users_per_segment_follow_a_power_law(world):
    counts = world.users.dropna(subset=["make"]).groupby(
        ["make", "model", "year"]).size().sort_values(ascending=False).to_numpy()
    assert len(counts) >= 100
    top = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top > 0.30, "the largest 10% of segments should hold a large share of users"
    rank = np.arange(1, len(counts) + 1)
    body = counts >= 3
    slope = np.polyfit(np.log(rank[body]), np.log(counts[body]), 1)[0]
    assert -1.6 < slope < -0.5
    assert counts.max() > 20 * np.median(counts)


def test_full_preset_vehicle_universe_has_about_1100_held_segments():
    spec = WorldSpec.preset("full")
    veh = W._vehicles(spec, np.random.default_rng(1))
    segments, share = W._segments(spec, veh, np.random.default_rng(1))
    assert len(segments) == 1_100 and len(veh.make_names) == 40
    assert len(veh.veh_year) > 3_000, "generic parts must be able to fit thousands of vehicles"
    assert share.min() * spec.n_users * 0.98 > 20, "every segment is held at full scale"


def test_user_emails_null_vehicles_and_thin_vehicles(world):
    users = world.users
    lower = users["email"].str.lower()
    repeated = users[lower.duplicated(keep=False)].assign(lower=lower)
    assert 0.005 < world.manifest["duplicate_emails"] / len(users) < 0.02
    assert lower.duplicated().sum() == world.manifest["duplicate_emails"]
    for _, pair in repeated.groupby("lower"):
        assert len(pair) == 2
        assert pair["email"].nunique() == 2, "repeats differ in case"
        assert pair["updated_at"].nunique() == 2
    assert (users["email"] != lower).sum() > 0.03 * len(users), "some addresses are mixed case"
    null = users["make"].isna()
    assert 0.01 < null.mean() < 0.035
    assert users.loc[null, ["model", "year"]].isna().all().all()
    fits = world.fitment.groupby(["make", "model", "year"])["sku"].nunique()
    have = users.dropna(subset=["make"])
    key = pd.MultiIndex.from_arrays([have["make"], have["model"], have["year"].astype(int)])
    n_fitting = fits.reindex(key).fillna(0).to_numpy()
    thin_users = int((n_fitting < 4).sum())
    assert thin_users > 0 and thin_users == world.manifest["thin_vehicle_users"]
    segments = world.truth.segments
    held_thin = segments["is_thin"] & (segments["n_users"] > 0)
    assert world.manifest["thin_vehicles"] == int(held_thin.sum()) >= 3


# ----------------------------------------------------------------------------- catalogue

def test_prices_are_lognormal_and_revenue_is_in_expensive_items(world, order_lines):
    price = world.catalog["price"]
    assert price.min() >= 5 and price.max() <= 4000
    assert (price < 20).mean() > 0.02 and (price > 1000).mean() > 0.05
    log_price = np.log(price)
    assert abs(log_price.mean() - np.log(price.median())) < 0.6
    revenue = order_lines["price"] * order_lines["quantity"]
    assert revenue[order_lines["price"] > 500].sum() / revenue.sum() >= 0.5


def test_catalogue_anomalies(world):
    cat = world.catalog
    skus = cat.drop_duplicates("sku")
    http = skus["image_url"].str.startswith("http://")
    assert skus["image_url"].str.startswith(("http://", "https://")).all()
    assert 0 < http.mean() < 0.03
    refurbished = skus["tags"].map(lambda t: "refurbished" in t)
    assert 0.005 < refurbished.mean() < 0.04
    service = skus["sku"].str.startswith("SVC-")
    assert 0.005 < service.mean() < 0.02 and skus.loc[service, "is_universal"].all()
    assert 0.08 < skus["is_universal"].mean() < 0.12
    types = set(cat["part_type"])
    assert set(W.LOW_VALUE_TYPES) <= types and set(W.LOW_VALUE_EXCEPTIONS) <= types
    assert {"Headlight", "Console Latch", "Turbo", "Ignition Coil"} <= types


def test_colour_and_specialised_variants(world):
    skus = world.catalog.drop_duplicates("sku")
    grouped = skus.dropna(subset=["variant_group"])
    sizes = grouped.groupby("variant_group").size()
    assert sizes.between(2, 3).all()
    assert 0.03 < len(grouped) / len(skus) < 0.08
    assert (grouped["sku"].str[:-1] == grouped["variant_group"]).all()
    assert grouped["sku"].str[-1].isin([c for c, _ in W.COLOURS]).all()
    names = set(skus["sku"])
    special = skus[skus["sku"].str.endswith(("HO", "HD")) & skus["sku"].str[:-2].isin(names)]
    assert len(special) == world.manifest["specialised_variants"] > 0
    base = skus[skus["sku"].isin(special["sku"].str[:-2])]
    assert special["variant_group"].isna().all() and base["variant_group"].isna().all()


def test_exactly_nine_skus_are_listed_twice_with_different_part_types(world):
    cat = world.catalog
    twice = cat[cat["sku"].duplicated(keep=False)]
    assert twice["sku"].nunique() == 9 == world.manifest["conflicting_catalog_skus"]
    for _, rows in twice.groupby("sku"):
        assert rows["part_type"].nunique() == 2
        other = rows.drop(columns="part_type").astype({"tags": str})
        assert len(other.drop_duplicates()) == 1, "the rows differ only in part_type"


def test_fitment_rows_and_generic_parts_fitting_most_vehicles(world):
    fit = world.fitment
    assert not fit.duplicated().any()
    assert set(fit["sku"]) <= set(world.catalog["sku"])
    vehicles = fit.groupby(["make", "model", "year"]).ngroups
    per_sku = fit.groupby("sku").size()
    universal = set(world.catalog.loc[world.catalog["is_universal"], "sku"])
    broad = per_sku[per_sku >= 0.5 * vehicles]
    assert len(broad) > 0 and set(broad.index) <= universal
    assert per_sku.median() < 0.1 * vehicles, "most parts fit few vehicles"


def test_most_purchases_are_of_products_without_fitment(world, order_lines):
    fitted = set(world.fitment["sku"])
    no_fit = ~order_lines["sku"].isin(fitted)
    assert 0.58 < no_fit.mean() < 0.72
    universal = world.catalog.drop_duplicates("sku").set_index("sku")["is_universal"]
    nofit_universal = universal.reindex(order_lines.loc[no_fit, "sku"])
    assert nofit_universal.mean() > 0.6 and (~nofit_universal).any()


# ----------------------------------------------------------------------------- ground truth

def test_segment_owners_prefer_their_favourites_to_global_top_parts(world, order_lines):
    truth = world.truth
    assert 4.5 < truth.segment_lift.median() < 8.0
    fav = truth.segment_top[truth.segment_top["rank"] <= 4]
    favourites = set(zip(fav["segment_id"], fav["sku"]))
    owners = order_lines.dropna(subset=["segment_id"])
    own = sum((int(s), k) in favourites for s, k in zip(owners["segment_id"], owners["sku"]))
    top4 = owners["sku"].isin(set(truth.global_top["sku"][:4])).sum()
    assert own > 2 * top4 > 0


def test_neighbouring_years_share_preferences(world):
    truth = world.truth
    top = truth.segment_top[truth.segment_top["rank"] <= 4].groupby("segment_id")["sku"].agg(set)
    seg = truth.segments.set_index("segment_id").loc[top.index]
    by_key = {(r.make, r.model, r.year): i for i, r in seg.iterrows()}
    adjacent = [len(top[i] & top[j]) / len(top[i] | top[j])
                for (make, model, year), i in by_key.items()
                if (j := by_key.get((make, model, year + 1))) is not None]
    rng = np.random.default_rng(0)
    ids = top.index.to_numpy()
    model_of = dict(zip(seg.index, zip(seg["make"], seg["model"])))
    unrelated = [len(top[a] & top[b]) / len(top[a] | top[b])
                 for a, b in rng.choice(ids, (300, 2)) if model_of[a] != model_of[b]]
    assert len(adjacent) > 20
    assert np.mean(adjacent) > 0.15 and np.mean(adjacent) > 5 * np.mean(unrelated)


# ----------------------------------------------------------------------------- events

def test_order_lines_are_three_events_and_orders_have_one_to_three_lines(world):
    events = world.events.drop_duplicates("event_id")
    orders = events[events["event_name"].isin(ORDER_NAMES)]
    per_line = orders.groupby(["order_id", "sku"])["event_name"].agg(sorted)
    assert (per_line.map(tuple) == tuple(sorted(ORDER_NAMES))).all()
    assert orders["event_id"].is_unique
    lines = per_line.groupby(level="order_id").size()
    assert lines.between(1, 3).all() and lines.max() >= 2 and (lines == 1).mean() > 0.5
    same = orders.groupby("order_id")[["user_id", "event_time"]].nunique()
    assert (same == 1).all().all()


def test_event_mix_and_repeat_purchases(world):
    events = world.events.drop_duplicates("event_id")
    share = events["event_name"].value_counts(normalize=True)
    assert share["Viewed Product"] > 0.6 and 0.01 < share["Cart Update"] < share["Placed Order"] * 3
    orders = events[events["event_name"] == "Placed Order"]
    per_buyer = orders.groupby("user_id")["order_id"].nunique()
    assert 0.10 < (per_buyer >= 2).mean() < 0.27


def test_duplicate_event_ids_are_exact_redeliveries(world):
    for events, key in ((world.events, "duplicate_event_ids"),
                        (world.holdout_events, "holdout_duplicate_event_ids")):
        dup = events["event_id"].duplicated()
        assert dup.sum() == world.manifest[key] > 0
        assert 0.002 < dup.mean() < 0.01
        assert events.duplicated().sum() == dup.sum(), "duplicates are whole-row copies"
    assert not set(world.events["event_id"]) & set(world.holdout_events["event_id"])


def test_views_and_carts_precede_purchases_of_the_same_sku(world, order_lines):
    events = pd.concat([world.events, world.holdout_events]).drop_duplicates("event_id")
    intent = events[events["event_name"].isin(["Viewed Product", "Cart Update"])]

    def preceded(lines: pd.DataFrame) -> float:
        pairs = lines[["user_id", "sku", "event_time", "order_id"]].merge(
            intent[["user_id", "sku", "event_time"]], on=["user_id", "sku"], suffixes=("", "_i"))
        gap = pd.to_datetime(pairs["event_time"]) - pd.to_datetime(pairs["event_time_i"])
        hit = pairs[(gap > pd.Timedelta(0)) & (gap < pd.Timedelta(days=30))]
        return hit[["order_id", "sku"]].drop_duplicates().shape[0] / len(lines)

    assert preceded(order_lines) > 0.5
    shuffled = order_lines.assign(sku=np.random.default_rng(0).permutation(order_lines["sku"]))
    assert preceded(shuffled) < 0.15


def test_holdout_continues_the_same_process(world):
    hold = world.holdout_events
    assert set(hold["user_id"]) <= set(world.users["user_id"])
    share = hold.drop_duplicates("event_id")["event_name"].value_counts(normalize=True)
    full = world.events.drop_duplicates("event_id")["event_name"].value_counts(normalize=True)
    assert (share - full).abs().max() < 0.05
    buyers = set(hold.loc[hold["event_name"] == "Placed Order", "user_id"])
    earlier = set(world.events.loc[world.events["event_name"] == "Placed Order", "user_id"])
    assert buyers & earlier and buyers - earlier


# ----------------------------------------------------------------------------- treatments

def test_campaign_funnel_rates(world):
    t = world.treatment_events
    assert set(t["campaign_id"]) == {"CMP-2026-SPRING"}
    assert set(t["treatment_id"]) <= {f"T{i:02d}" for i in range(1, 25)}
    assert t["event_id"].is_unique and set(t["kind"]) == set(W.TREATMENT_KINDS)
    kinds = t["kind"].value_counts()
    sent = kinds["SENT"]
    assert abs(kinds["DELIVERED"] / sent - 0.741) < 0.05
    assert kinds["DELIVERED"] + kinds["DELIVERY_FAILED"] == sent
    assert abs(kinds["VIEWED"] / sent - 0.108) < 0.035
    assert 0.002 < kinds["CLICKED"] / sent < 0.025
    failed = t["kind"] == "DELIVERY_FAILED"
    assert t.loc[failed, "reason"].isin(W.FAILURE_REASONS).all()
    assert t.loc[~failed, "reason"].isna().all()
    sent_users = set(t.loc[t["kind"] == "SENT", "user_id"])
    assert set(t["user_id"]) == sent_users
    first = t.groupby("user_id")["kind"].first()
    assert (first == "SENT").all(), "SENT comes first for every recipient"


def test_true_treatment_ctrs_and_click_orders(world):
    truth = world.truth
    ctr = pd.Series(truth.treatment_ctr)
    weights = pd.Series(truth.treatment_weights)
    assert len(ctr) == 24 and ctr.nunique() > 10
    assert abs((ctr * weights).sum() / weights.sum() - 0.074) < 0.002
    assert abs(ctr.max() - 0.103) < 1e-6 and ctr.min() > 0
    clicks = world.treatment_events[world.treatment_events["kind"] == "CLICKED"]
    events = pd.concat([world.events, world.holdout_events])
    orders = events[events["event_name"] == "Placed Order"]
    after = clicks[["user_id", "event_time"]].merge(orders[["user_id", "event_time"]],
                                                   on="user_id", suffixes=("_click", ""))
    gap = pd.to_datetime(after["event_time"]) - pd.to_datetime(after["event_time_click"])
    ordered = after[(gap > pd.Timedelta(0)) & (gap <= pd.Timedelta(days=7))]["user_id"].nunique()
    assert truth.campaign_orders > 0 and ordered >= truth.campaign_orders * 0.8


# ----------------------------------------------------------------------------- files

def _read(path: str, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        return pq.read_table(path).to_pandas()
    with open(path, "rb") as f:
        return pd.DataFrame([orjson.loads(line) for line in f])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_written_files_round_trip(world, tmp_path, fmt):
    manifest = write_world(world, str(tmp_path), fmt)
    assert manifest["format"] == fmt and manifest["bad_rows_total"] == 0
    assert orjson.loads((tmp_path / "world.json").read_bytes()) == manifest
    for name, frame in world.tables().items():
        back = _read(str(tmp_path / f"{name}.{fmt}"), fmt)
        assert list(back.columns) == list(frame.columns)
        assert _records(back) == _records(frame), name
    if fmt == "parquet":
        schema = pq.read_schema(tmp_path / "catalog.parquet")
        assert str(schema.field("tags").type) == "list<element: string>"
        assert str(pq.read_schema(tmp_path / "users.parquet").field("year").type) == "int64"


def test_bad_rows_in_jsonl(world, tmp_path):
    manifest = write_world(world, str(tmp_path), "jsonl", bad_rows=2)
    for table, kinds in W.BAD_KINDS.items():
        assert manifest["bad_rows_by_kind"][table] == {k: 2 for k in kinds}
        lines = (tmp_path / f"{table}.jsonl").read_bytes().splitlines()
        assert len(lines) == len(world.tables()[table]) + 2 * len(kinds)
        strict_failures, records = 0, []
        for line in lines:
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                strict_failures += 1
        text_only = {"malformed_json", "truncated_line", "nan_price"} & set(kinds)
        assert strict_failures == 2 * len(text_only)
        frame = pd.DataFrame(records)
        required = W.MISSING_FIELDS[table]
        assert frame[list(required)].isna().any(axis=1).sum() == 2
        if "negative_price" in kinds:
            assert (frame["price"] < 0).sum() == 2
        if table == "events":
            assert (~frame["event_name"].isin(W.EVENT_NAMES)).sum() == 2
        if "unknown_sku" in kinds:
            assert (~frame["sku"].dropna().isin(world.catalog["sku"])).sum() == 2


def test_bad_rows_in_parquet_are_row_level_only(world, tmp_path):
    manifest = write_world(world, str(tmp_path), "parquet", bad_rows=3)
    for table, kinds in W.BAD_KINDS.items():
        row_kinds = [k for k in kinds if k not in W.TEXT_ONLY_KINDS]
        assert manifest["bad_rows_by_kind"][table] == {k: 3 for k in row_kinds}
        data = pq.read_table(tmp_path / f"{table}.parquet")
        assert data.num_rows == len(world.tables()[table]) + 3 * len(row_kinds)
        if "nan_price" in kinds:
            price = data["price"]
            assert pc.sum(pc.is_nan(price)).as_py() == 3, "NaN, not null"
            assert pc.sum(pc.less(price, 0)).as_py() == 3
    assert manifest["bad_rows_total"] == 3 * sum(
        len([k for k in kinds if k not in W.TEXT_ONLY_KINDS]) for kinds in W.BAD_KINDS.values())


def test_cli_writes_world_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "tiny_world"
    assert generate_world.main(["--preset", "tiny", "--seed", "3", "--out", str(out),
                                "--format", "parquet"]) == 0
    printed = capsys.readouterr().out
    assert "as_of" in printed and "events" in printed and "bad rows planted" in printed
    manifest = orjson.loads((out / "world.json").read_bytes())
    assert manifest["preset"] == "tiny" and manifest["seed"] == 3
    assert manifest["bad_rows_by_kind"]["events"]["unknown_sku"] == 5
    for name in W.TABLES:
        assert (out / f"{name}.parquet").exists()
    with pytest.raises(SystemExit):
        generate_world.main(["--help"])
    assert not math.isnan(manifest["stats"]["median_segment_lift"])


# Recorded when models/world.py became the models/world/ package (#14): the tiny preset,
# seed 7, JSON Lines with 5 bad rows of each kind must stay byte-for-byte the same, so
# refactoring the generator cannot silently change the worlds tests and benches are built on.
# A deliberate change to the automotive world updates these hashes in the same commit
# (#18: treatment_events gained each SENT's propensity and allocation_version; the rest held).
TINY_SEED7_JSONL_SHA256 = {
    "catalog.jsonl": "4752bd070672ee71bf30b7c58c85ae1bc1141a24a9c33e181e6aa6bc8c21059d",
    "events.jsonl": "ea2d7ca56d54497ab905818f553043843857a49cdf516251366a256d3d9601cf",
    "fitment.jsonl": "add75b001500d26d08d9c31511aff6f478dd559446f3b4ef466a50642c4ed75d",
    "holdout_events.jsonl": "445d7d206167ec8ee68ac21e82bc766096d39c6002fa5ca6e5de9da661e47642",
    "treatment_events.jsonl": "5e541a17465278b7e9a081fda0ea7cc90c590f92a0a27d396cc53a83c655810f",
    "users.jsonl": "37b5342cd703cfe85795421cc1595cd2fdd0a53693cb4ddaca0a4404b6fa4f10",
    "world.json": "b749fc130863f83e6d96a67c20e5ab0216c6b476cd933a1aea83ab1c82991a89",
}


def test_tiny_world_files_are_byte_for_byte_unchanged(world, tmp_path):
    import hashlib

    write_world(world, str(tmp_path), "jsonl", bad_rows=5)
    got = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
           for name in TINY_SEED7_JSONL_SHA256}
    assert got == TINY_SEED7_JSONL_SHA256


# ----------------------------------------------------------------------------- wholesale (#14)

@pytest.fixture(scope="module")
def wholesale():
    return W.generate(W.preset("wholesale_tiny"), 7)


@pytest.fixture(scope="module")
def wholesale_lines(wholesale):
    events = pd.concat([wholesale.events, wholesale.holdout_events]).drop_duplicates("event_id")
    lines = events[events["event_name"].isin(ORDER_NAMES)].copy()
    lines["t"] = pd.to_datetime(lines["event_time"])
    return lines


def test_presets_name_both_generators():
    assert set(W.PRESETS) == {"tiny", "demo", "full", "wholesale", "wholesale_tiny"}
    spec = W.preset("wholesale")
    assert isinstance(spec, W.WholesaleSpec) and spec.n_users == 429
    assert W.preset("demo") == WorldSpec.preset("demo")
    with pytest.raises(ValueError):
        W.preset("huge")


def test_wholesale_is_deterministic_and_follows_the_contract(wholesale):
    again = W.generate(W.preset("wholesale_tiny"), 7)
    for name, frame in wholesale.tables().items():
        pd.testing.assert_frame_equal(frame, again.tables()[name])
    assert again.manifest == wholesale.manifest
    assert len(wholesale.fitment) == 0 and len(wholesale.treatment_events) == 0
    assert list(wholesale.users.columns) == ["user_id", "email", "business_type", "region",
                                             "updated_at"]
    for events in (wholesale.events, wholesale.holdout_events):
        assert events["event_time"].str.match(RFC3339).all()
        assert set(events["sku"]) <= set(wholesale.catalog["sku"])
        is_order = events["event_name"].isin(ORDER_NAMES)
        assert events.loc[is_order, "order_id"].notna().all()
        assert events.loc[~is_order, "order_id"].isna().all()
    m = wholesale.manifest
    assert m["as_of"] < m["holdout_start"] <= wholesale.holdout_events["event_time"].min()
    assert wholesale.catalog["part_type"].nunique() >= 30, "product groups are the part types"
    assert wholesale.catalog["is_universal"].all()


def test_wholesale_clients_order_weekly_from_recurring_baskets(wholesale, wholesale_lines):
    lines, m = wholesale_lines, wholesale.manifest
    hist = lines[lines["event_time"] < m["holdout_start"]]
    hold = lines[lines["event_time"] >= m["holdout_start"]]
    weeks = wholesale.spec.history_days / 7
    orders = hist.groupby("user_id")["order_id"].nunique()
    assert len(orders) == wholesale.spec.n_users and (orders / weeks).median() > 0.5
    assert (hist.groupby("order_id")["user_id"].nunique() == 1).all()
    # Most holdout lines are items the client bought before; a shuffled world would not be.
    seen = set(zip(hist["user_id"], hist["sku"]))
    again = np.mean([pair in seen for pair in zip(hold["user_id"], hold["sku"])])
    shuffled = np.random.default_rng(0).permutation(hold["sku"].to_numpy())
    assert again > 0.7 > 0.2 > np.mean([p in seen for p in zip(hold["user_id"], shuffled)])


def test_wholesale_repurchase_gaps_follow_each_skus_interval(wholesale, wholesale_lines):
    lines = wholesale_lines.sort_values("t")
    gaps = lines.groupby(["user_id", "sku"])["t"].diff().dt.total_seconds() / 86_400
    per_sku = gaps.groupby(lines["sku"]).median().dropna()
    truth = wholesale.truth.sku_interval_days.reindex(per_sku.index)
    busy = lines.groupby("sku").size().reindex(per_sku.index) >= 10
    ratio = (per_sku[busy] / truth[busy])
    assert busy.sum() > 50
    assert 0.8 < ratio.median() < 1.3, "observed gaps are the SKU's typical interval"
    assert np.corrcoef(per_sku[busy], truth[busy])[0, 1] > 0.6


def test_wholesale_clients_sharing_a_collection_buy_alike(wholesale, wholesale_lines):
    bought = wholesale_lines.groupby("user_id")["sku"].agg(set)
    tastes = wholesale.truth.client_collections
    users = sorted(bought.index)
    rng = np.random.default_rng(1)
    sharing, other = [], []
    for a, b in rng.choice(users, (600, 2)):
        if a == b:
            continue
        jac = len(bought[a] & bought[b]) / len(bought[a] | bought[b])
        (sharing if set(tastes[a]) & set(tastes[b]) else other).append(jac)
    assert len(sharing) > 30 and len(other) > 30
    assert np.mean(sharing) > 3 * np.mean(other)


def test_wholesale_trending_products_sell_only_after_launch_and_grow(wholesale, wholesale_lines):
    trend = wholesale.truth.trending
    lines = wholesale_lines.merge(trend, on="sku")
    assert (lines["event_time"] >= lines["launch"]).all()
    start = pd.Timestamp(wholesale.manifest["holdout_start"])
    recent = (lines["t"] >= start - pd.Timedelta(days=28)) & (lines["t"] < start)
    before = (lines["t"] >= start - pd.Timedelta(days=56)) & (lines["t"] < start - pd.Timedelta(
        days=28))
    assert recent.sum() > 1.5 * before.sum() > 0


def test_wholesale_cli_writes_parquet_with_its_user_attributes(tmp_path):
    out = tmp_path / "ws"
    assert generate_world.main(["--preset", "wholesale_tiny", "--out", str(out),
                                "--format", "parquet", "--bad_rows", "1"]) == 0
    manifest = orjson.loads((out / "world.json").read_bytes())
    assert manifest["preset"] == "wholesale_tiny" and manifest["row_counts"]["fitment"] == 0
    users = pq.read_table(out / "users.parquet").to_pandas()
    assert {"business_type", "region"} <= set(users.columns)
    assert users["business_type"].notna().sum() == manifest["written_rows"]["users"] == 81
