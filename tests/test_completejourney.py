"""Tests for the Complete Journey importer: mapping rules on a tiny hand-made source, then the
real sample (they fail when ../shared/data/completejourney is absent): contract-valid files,
a 4-week holdout, and every transaction row accounted for."""
import csv
import gzip
import json
import os

import orjson
import pandas as pd
import pytest

from models import completejourney as cj
from models import contracts
from pipelines import import_dataset
from transforms.io import find_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_SOURCE = os.environ.get("COMPLETEJOURNEY_DIR",
                             os.path.join(REPO, "..", "shared", "data", "completejourney"))


def read_jsonl(path):
    with open(path, "rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


def validated(out_dir, table):
    """The table's rows after SPEC §2 validation, asserting that no row is rejected."""
    records = read_jsonl(os.path.join(out_dir, f"{table}.jsonl"))
    if not records:
        return pd.DataFrame()
    checked = contracts.validate(table, contracts.records_frame(table, records))
    assert len(checked.bad_positions) == 0, (table, sorted(set(checked.bad_reasons)))
    return checked.rows


# --- the mapping, on a tiny source -----------------------------------------------------

def frame(rows, columns):
    return pd.DataFrame(rows, columns=columns, dtype=object).astype(object).where(
        lambda f: f.notna(), None)


TX_COLUMNS = ["household_id", "store_id", "basket_id", "product_id", "quantity", "sales_value",
              "retail_disc", "coupon_disc", "coupon_match_disc", "week", "transaction_timestamp"]


def tiny_source() -> cj.Source:
    tx = [
        ["1", "s1", "B1", "P1", "2.0", "5.0", "0", "0", "0", "2", "2017-01-10 10:00:00-05:00"],
        ["2", "s1", "B2", "P2", "15000.0", "30.0", "0", "0", "0", "5", "2017-02-01 09:00:00-05:00"],
        ["1", "s1", "B3", "P1", "0.0", "0.0", "0", "0", "0", "6", "2017-02-05 09:00:00-05:00"],
        ["3", "s2", "B4", "P9", "1.0", "1.0", "0", "0", "0", "7", "2017-02-10 09:00:00-05:00"],
        ["2", "s2", "B5", "P4", "1.0", "0.0", "0", "0", "0", "8", "2017-02-12 09:00:00-05:00"],
        ["1", "s2", "B6", "P3", "1.0", "1.0", "0", "0", "0", "12", "2017-03-20 12:00:00-04:00"],
        ["2", "s2", "B7", "P1", "1.0", "2.0", "0", "0", "0", "13", "2017-03-31 23:30:00-04:00"],
    ]
    products = [
        ["P1", "10", "GROCERY", "National", "FLUID MILK PRODUCTS", "MILK", "1 GA"],
        ["P2", "11", "MISCELLANEOUS", "National", "COUPON/MISC ITEMS", "GASOLINE-REG UNLEADED",
         None],
        ["P3", "12", "MISCELLANEOUS", "Private", None, None, None],
        ["P4", "13", "GROCERY", "Private", "BAG SNACKS", "CHIPS", None],
        ["P5", "14", "GROCERY", "Private", "SOUP", "SOUP", None],
    ]
    demographics = [["1", "45-54", "50-74K", "Homeowner", None, "2", "2 Adults No Kids", "0"]]
    return cj.Source(
        transactions=frame(tx, TX_COLUMNS),
        products=frame(products, ["product_id", "manufacturer_id", "department", "brand",
                                  "product_category", "product_type", "package_size"]),
        demographics=frame(demographics, ["household_id", "age", "income", "home_ownership",
                                          "marital_status", "household_size", "household_comp",
                                          "kids_count"]),
        campaigns=frame([["1", "1"], ["1", "4"]], ["campaign_id", "household_id"]),
        campaign_descriptions=frame([["1", "Type A", "2017-03-01", "2017-04-01"]],
                                    ["campaign_id", "campaign_type", "start_date", "end_date"]),
        coupon_redemptions=frame([["1", "555", "1", "2017-03-05"]],
                                 ["household_id", "coupon_upc", "campaign_id",
                                  "redemption_date"]),
    )


@pytest.fixture(scope="module")
def tiny():
    return cj.convert(tiny_source(), holdout_days=7)


def test_every_transaction_row_is_an_event_or_a_counted_drop(tiny):
    m = tiny.manifest
    assert m["dropped"]["transactions"] == {
        cj.DROP_UNKNOWN_PRODUCT: 1, cj.DROP_ZERO_QUANTITY: 1, cj.DROP_UNPRICED_PRODUCT: 1}
    assert m["reconciliation"] == {"transactions": 7, "events": 3, "holdout_events": 1,
                                   "dropped": 3, "campaigns + coupon_redemptions": 3,
                                   "treatment_events": 3, "treatment_rows_dropped": 0}
    assert tiny.tables["events"]["event_id"].tolist() == ["B1-P1", "B2-P2", "B6-P3"]
    assert tiny.tables["holdout_events"]["event_id"].tolist() == ["B7-P1"]


def test_events_are_ordered_products_in_utc(tiny):
    first = tiny.tables["events"].iloc[0]
    assert first["event_time"] == "2017-01-10T15:00:00Z"  # EST, -05:00
    assert tiny.tables["events"].iloc[2]["event_time"] == "2017-03-20T16:00:00Z"  # EDT, -04:00
    assert (first["event_name"], first["order_id"], first["user_id"], first["sku"]) == (
        "Ordered Product", "B1", "1", "P1")
    assert (first["quantity"], first["price"]) == (2, 2.5)  # unit price = sales / quantity


def test_metered_fuel_becomes_one_unit_at_its_sales_value(tiny):
    fuel = tiny.tables["events"].set_index("sku").loc["P2"]
    assert (fuel["quantity"], fuel["price"], fuel["metered_quantity"]) == (1, 30.0, 15000)
    assert tiny.manifest["metered_lines"] == 1


def test_holdout_is_the_last_days_in_new_york_calendar_days(tiny):
    m = tiny.manifest
    assert (m["holdout_start"], m["holdout_end"]) == ("2017-03-25T04:00:00Z",
                                                      "2017-04-01T04:00:00Z")
    assert m["as_of"] == "2017-03-20T16:00:00Z"  # last event before the holdout


def test_catalog_prices_titles_and_part_types(tiny):
    catalog = tiny.tables["catalog"].set_index("sku")
    assert list(catalog.index) == ["P1", "P2", "P3"]  # P4 only free, P5 never sold
    assert catalog.loc["P1", "price"] == 2.25  # median of 2.5 and 2.0 (holdout line included)
    assert catalog.loc["P3", "part_type"] == "MISCELLANEOUS"  # no category: the department
    assert catalog.loc["P3", "title"] == "MISCELLANEOUS"
    assert catalog.loc["P1", "image_url"] == (
        "https://images.completejourney.example/products/P1.jpg")
    assert catalog["is_universal"].all() and catalog["variant_group"].isna().all()
    assert tiny.manifest["dropped"]["products"] == {
        "never in the transactions sample": 1, "only on dropped transaction lines": 1}


def test_users_are_every_household_and_unknown_demographics_form_a_segment(tiny):
    users = tiny.tables["users"].set_index("user_id")
    assert list(users.index) == ["1", "2", "3", "4"]  # 4 is only in the campaign list
    assert users.loc["1", ["income", "age", "household_size"]].tolist() == ["50-74K", "45-54",
                                                                            "2"]
    assert users.loc["1", "marital_status"] == "unknown"  # a blank demographic field
    assert users.loc["2", ["income", "age", "household_size"]].tolist() == ["unknown"] * 3
    assert users.loc["3", "email"] == "household_3@completejourney.example"
    assert users["has_demographics"].tolist() == [True, False, False, False]


def test_targeting_is_sent_and_redemption_is_clicked(tiny):
    te = tiny.tables["treatment_events"]
    assert te[["kind", "user_id", "event_time", "treatment_id", "campaign_id"]].values.tolist() == [
        ["SENT", "1", "2017-03-01T05:00:00Z", "Type A", "1"],
        ["SENT", "4", "2017-03-01T05:00:00Z", "Type A", "1"],
        ["CLICKED", "1", "2017-03-05T05:00:00Z", "Type A", "1"],
    ]
    assert te["event_id"].is_unique


def test_repeated_and_unusable_campaign_rows_are_counted_not_silently_dropped():
    source = tiny_source()
    campaigns = pd.concat([source.campaigns, source.campaigns.iloc[:1],
                           frame([["99", "1"]], ["campaign_id", "household_id"])],
                          ignore_index=True)
    converted = cj.convert(source._replace(campaigns=campaigns), holdout_days=7)
    assert converted.manifest["dropped"]["treatment_events"] == {
        "targeting row repeated": 1, "campaign without a description or a parseable date": 1}
    assert len(converted.tables["treatment_events"]) == 3


def test_written_tiny_dataset_passes_the_contracts(tiny, tmp_path):
    manifest = cj.write_dataset(tiny, str(tmp_path))
    for table in cj.TABLES:
        rows = validated(str(tmp_path), table)
        assert len(rows) == manifest["row_counts"][table] == manifest["written_rows"][table]
    assert find_table(str(tmp_path), "fitment").endswith("fitment.jsonl")
    assert json.load(open(tmp_path / "world.json"))["as_of"] == tiny.manifest["as_of"]


def test_missing_source_file_is_a_clear_error(tmp_path):
    with pytest.raises(cj.SourceError, match="transactions_sample.csv.gz not found"):
        cj.read_source(str(tmp_path))
    assert import_dataset.main(["completejourney", "--source", str(tmp_path),
                                "--out", str(tmp_path / "out")]) == 2  # usage: exit 2


# --- the real sample ---------------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    # The real sample ships in ../shared/data: a missing copy fails, never skips.
    if not os.path.exists(os.path.join(REAL_SOURCE, cj.SOURCE_FILES["transactions"])):
        pytest.fail(f"Complete Journey sample not found at {REAL_SOURCE}: the tests need "
                    "../shared/data beside the clone (or COMPLETEJOURNEY_DIR)")
    out = str(tmp_path_factory.mktemp("completejourney"))
    assert import_dataset.main(["completejourney", "--source", REAL_SOURCE, "--out", out]) == 0
    with open(os.path.join(out, "world.json"), encoding="utf-8") as handle:
        return out, json.load(handle)


def source_transactions():
    with gzip.open(os.path.join(REAL_SOURCE, cj.SOURCE_FILES["transactions"]), "rt") as handle:
        return list(csv.DictReader(handle))


def test_real_files_pass_the_contracts_with_zero_bad_rows(real):
    out, manifest = real
    tables = {t: validated(out, t) for t in cj.TABLES}
    for table, rows in tables.items():
        assert len(rows) == manifest["row_counts"][table]
    assert manifest["row_counts"]["fitment"] == 0
    catalog, users = tables["catalog"], tables["users"]
    assert catalog["sku"].is_unique and (catalog["price"] > 0).all()
    assert catalog["image_url"].str.startswith("https://").all()
    for table in ("events", "holdout_events"):
        assert tables[table]["sku"].isin(catalog["sku"]).all()  # no unknown SKU dead letters
        assert tables[table]["user_id"].isin(users["user_id"]).all()
        assert tables[table]["event_id"].is_unique
    assert tables["treatment_events"]["user_id"].isin(users["user_id"]).all()
    assert users["email_lower"].is_unique and users["user_id"].is_unique
    assert manifest["row_counts"]["users"] == 2_379
    assert manifest["users_with_demographics"] == 801


def test_real_holdout_is_the_last_four_weeks(real):
    out, manifest = real
    start, end = pd.Timestamp(manifest["holdout_start"]), pd.Timestamp(manifest["holdout_end"])
    assert end - start == pd.Timedelta(days=28)
    history = pd.to_datetime([r["event_time"] for r in read_jsonl(f"{out}/events.jsonl")])
    holdout = pd.to_datetime([r["event_time"] for r in read_jsonl(f"{out}/holdout_events.jsonl")])
    assert history.max() < start <= holdout.min() and holdout.max() < end
    assert pd.Timestamp(manifest["as_of"]) == history.max()
    last = max(pd.Timestamp(r["transaction_timestamp"]) for r in source_transactions())
    assert end - pd.Timedelta(days=1) <= last < end  # the window ends the day of the last sale


def test_real_rows_reconcile_with_the_source(real):
    out, manifest = real
    source = source_transactions()
    assert len(source) == 75_000
    written = {r["event_id"]: r for t in ("events", "holdout_events")
               for r in read_jsonl(f"{out}/{t}.jsonl")}
    dropped = manifest["dropped"]["transactions"]
    assert len(written) + sum(dropped.values()) == len(source)
    # Recompute each drop independently from the source rows.
    with gzip.open(os.path.join(REAL_SOURCE, cj.SOURCE_FILES["products"]), "rt") as handle:
        known = {r["product_id"] for r in csv.DictReader(handle)}
    missing = [r for r in source if f"{r['basket_id']}-{r['product_id']}" not in written]
    unknown = [r for r in missing if r["product_id"] not in known]
    zero = [r for r in missing if r["product_id"] in known and float(r["quantity"]) == 0]
    assert len(unknown) == dropped[cj.DROP_UNKNOWN_PRODUCT] == 222
    assert len(zero) == dropped[cj.DROP_ZERO_QUANTITY]
    rest = [r for r in missing if r not in unknown and r not in zero]
    assert len(rest) == dropped.get(cj.DROP_UNPRICED_PRODUCT, 0)
    priced = {r["product_id"] for r in source if float(r["sales_value"]) > 0
              and float(r["quantity"]) > 0}
    assert all(r["product_id"] not in priced for r in rest)
    # Kept rows keep their basket, household and sales value.
    sample = source[0]
    event = written[f"{sample['basket_id']}-{sample['product_id']}"]
    assert (event["order_id"], event["user_id"], event["sales_value"]) == (
        sample["basket_id"], sample["household_id"], float(sample["sales_value"]))


def test_real_redemption_rates_match_the_dataset_readme(real):
    """CLICKED recipients / SENT recipients per campaign type = the README's 16.6%, 6.5%, 5.9%."""
    out, manifest = real
    te = pd.DataFrame(read_jsonl(f"{out}/treatment_events.jsonl"))
    assert manifest["source_rows"]["campaigns"] == (te["kind"] == "SENT").sum()
    assert manifest["source_rows"]["coupon_redemptions"] == (te["kind"] == "CLICKED").sum()
    recipients = te[["campaign_id", "user_id", "treatment_id", "kind"]].drop_duplicates()
    counts = recipients.groupby(["treatment_id", "kind"]).size().unstack()
    rate = (counts["CLICKED"] / counts["SENT"]).round(3).to_dict()
    assert rate == {"Type A": 0.166, "Type B": 0.065, "Type C": 0.059}
    sent = te.loc[te["kind"] == "SENT"].set_index(["campaign_id", "user_id"])["event_time"]
    clicked = te.loc[te["kind"] == "CLICKED"]
    sent_at = sent.reindex(pd.MultiIndex.from_frame(clicked[["campaign_id", "user_id"]]))
    assert sent_at.notna().all() and (sent_at.to_numpy() <= clicked["event_time"].to_numpy()).all()
