"""dunnhumby "The Complete Journey" (a real grocer) → the SPEC §2 contract tables.

Pure pandas, no Beam: :func:`read_source` reads the gzipped CSVs,
:func:`convert` maps them onto the contract and :func:`write_dataset` writes
JSON Lines plus a ``world.json`` manifest shaped like the synthetic
generator's. Nothing is dropped silently: every source row is either written
or counted in the manifest under a reason, and :func:`convert` checks that the
transaction rows reconcile (``events + holdout_events + dropped == source``).

Mapping (decisions are explained in docs/real-data.md):

* users: one per household seen in any file (``user_id`` = ``household_id``);
  demographics become user columns, ``"unknown"`` where a household has none,
  so those households still form one segment; e-mail and ``updated_at`` are
  synthesised deterministically.
* catalog: every product with at least one kept transaction line (a product
  that never sold has no observed price); ``part_type`` = product_category,
  ``price`` = median unit price (``sales_value / quantity``) over its lines
  with a positive sales value; https image URL synthesised; universal; no tags.
* events: one ``Ordered Product`` per transaction line, ``order_id`` =
  ``basket_id``, time converted to UTC. Lines with ``quantity`` over
  :data:`METERED_QUANTITY` are metered fuel (thousandths of a gallon): they
  become one unit at the line's sales value, the original kept as
  ``metered_quantity``.
* holdout_events: the transaction lines of the last :data:`HOLDOUT_DAYS` days
  (New York calendar days, up to midnight after the last transaction).
* treatment_events: campaign targeting → ``SENT`` per (campaign, household) at
  the campaign's start; a coupon redemption → ``CLICKED`` (the recipient acted
  on the treatment) at the redemption date; ``treatment_id`` = campaign type.
  The mailers have no delivery or open tracking, so no DELIVERED or VIEWED.
* fitment: none (a grocer has no fitment); an empty file is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import orjson
import pandas as pd

from models.contracts import SCHEMAS

DATASET = "completejourney"
TIMEZONE = "America/New_York"
HOLDOUT_DAYS = 28
# No grocery line in the sample sells more than 90 units; fuel lines count thousandths of a
# gallon (5,000-32,000). Lines above this are metered, not unit sales.
METERED_QUANTITY = 1_000
EMAIL_DOMAIN = "completejourney.example"
IMAGE_URL = "https://images.completejourney.example/products/{sku}.jpg"
UPDATED_AT = "2017-01-01T00:00:00Z"
UNKNOWN = "unknown"
ORDER_EVENT = "Ordered Product"
SOURCE_FILES = {
    "transactions": "transactions_sample.csv.gz",
    "products": "products.csv.gz",
    "demographics": "demographics.csv.gz",
    "campaigns": "campaigns.csv.gz",
    "campaign_descriptions": "campaign_descriptions.csv.gz",
    "coupon_redemptions": "coupon_redemptions.csv.gz",
}
DEMOGRAPHICS = ("age", "income", "household_size", "home_ownership", "marital_status",
                "household_comp", "kids_count")
TABLES = ("catalog", "fitment", "users", "events", "holdout_events", "treatment_events")
_NUMERIC = ("quantity", "sales_value", "retail_disc", "coupon_disc", "coupon_match_disc")

# Reasons a transaction line is not written, in the order they are tested (first one wins).
DROP_MISSING_ID = "missing household_id, basket_id or product_id"
DROP_BAD_TIME = "unparseable transaction_timestamp"
DROP_BAD_NUMBER = "quantity or sales_value missing or negative"
DROP_UNKNOWN_PRODUCT = "product_id not in products"
DROP_ZERO_QUANTITY = "quantity 0 (no item sold)"
DROP_UNPRICED_PRODUCT = "product never sold at a positive sales value (no catalogue price)"
DROP_ORDER = (DROP_MISSING_ID, DROP_BAD_TIME, DROP_BAD_NUMBER, DROP_UNKNOWN_PRODUCT,
              DROP_ZERO_QUANTITY, DROP_UNPRICED_PRODUCT)


class SourceError(ValueError):
    """The source directory lacks a file or a file lacks a column."""


class Source(NamedTuple):
    """The six CSV files as string-typed frames (numbers parsed where the mapping needs them)."""

    transactions: pd.DataFrame
    products: pd.DataFrame
    demographics: pd.DataFrame
    campaigns: pd.DataFrame
    campaign_descriptions: pd.DataFrame
    coupon_redemptions: pd.DataFrame


_REQUIRED_COLUMNS = {
    "transactions": ("household_id", "basket_id", "product_id", "quantity", "sales_value",
                     "transaction_timestamp"),
    "products": ("product_id", "department", "brand", "product_category", "product_type"),
    "demographics": ("household_id",) + DEMOGRAPHICS,
    "campaigns": ("campaign_id", "household_id"),
    "campaign_descriptions": ("campaign_id", "campaign_type", "start_date"),
    "coupon_redemptions": ("household_id", "coupon_upc", "campaign_id", "redemption_date"),
}


def read_source(directory: str) -> Source:
    """Read the Complete Journey CSVs (gzipped) from ``directory``; ids stay strings."""
    frames = {}
    for name, filename in SOURCE_FILES.items():
        path = os.path.join(directory, filename)
        if not os.path.exists(path):
            raise SourceError(f"{path} not found (expected the Complete Journey file {filename})")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        missing = [c for c in _REQUIRED_COLUMNS[name] if c not in frame.columns]
        if missing:
            raise SourceError(f"{path} lacks column(s) {', '.join(missing)}")
        frames[name] = frame
    return Source(**frames)


@dataclass
class Converted:
    """The contract tables (frames in file column order) and the manifest describing them."""

    tables: Dict[str, pd.DataFrame]
    manifest: dict = field(default_factory=dict)


def rfc3339(stamps: pd.Series) -> pd.Series:
    """UTC timestamps as RFC 3339 text with a ``Z``, e.g. ``2017-01-28T19:06:53Z``."""
    return stamps.dt.tz_convert("UTC").dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def local_midnight_utc(dates: pd.Series) -> pd.Series:
    """``YYYY-MM-DD`` New York calendar dates → the UTC instant of that local midnight."""
    local = pd.to_datetime(dates, format="%Y-%m-%d", errors="coerce")
    return local.dt.tz_localize(TIMEZONE, nonexistent="shift_forward",
                                ambiguous="NaT").dt.tz_convert("UTC")


def _iso(stamp: pd.Timestamp) -> str:
    return stamp.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_text(*columns: pd.Series, default: pd.Series) -> pd.Series:
    """Per row, the first non-empty value among ``columns``, else ``default``."""
    out = default.astype(object).copy()
    for column in reversed(columns):
        text = column.astype(object).where(column.notna(), None)
        text = text.map(lambda v: v.strip() if isinstance(v, str) and v.strip() else None)
        out = text.where(text.notna(), out)
    return out


def _holdout_window(times: pd.Series, days: int):
    """(start, end) in UTC: ``days`` New York days ending at midnight after the last line."""
    last_local = times.max().tz_convert(TIMEZONE)
    end_local = (last_local.normalize() + pd.Timedelta(days=1)).tz_localize(None)
    start_local = end_local - pd.Timedelta(days=days)
    end = pd.Timestamp(end_local).tz_localize(TIMEZONE).tz_convert("UTC")
    start = pd.Timestamp(start_local).tz_localize(TIMEZONE).tz_convert("UTC")
    return start, end


def _transactions(source: Source) -> pd.DataFrame:
    """Transaction lines typed, with a ``drop`` reason column (None where kept)."""
    tx = source.transactions.copy()
    n = len(tx)
    drop = np.full(n, None, dtype=object)

    def mark(mask, reason):
        drop[np.asarray(mask, bool) & (drop == None)] = reason  # noqa: E711

    ids = tx[["household_id", "basket_id", "product_id"]]
    mark(ids.isna().any(axis=1).to_numpy(), DROP_MISSING_ID)
    tx["event_time"] = pd.to_datetime(tx["transaction_timestamp"], utc=True, errors="coerce",
                                      format="ISO8601")
    mark(tx["event_time"].isna().to_numpy(), DROP_BAD_TIME)
    for column in _NUMERIC:
        if column in tx.columns:
            tx[column] = pd.to_numeric(tx[column], errors="coerce")
    quantity, value = tx["quantity"].to_numpy(float), tx["sales_value"].to_numpy(float)
    mark(~(np.isfinite(quantity) & np.isfinite(value) & (quantity >= 0) & (value >= 0)),
         DROP_BAD_NUMBER)
    mark(~tx["product_id"].isin(source.products["product_id"]).to_numpy(), DROP_UNKNOWN_PRODUCT)
    mark(quantity == 0, DROP_ZERO_QUANTITY)
    kept = drop == None  # noqa: E711
    priced = tx.loc[kept & (value > 0), "product_id"].unique()
    mark(~tx["product_id"].isin(priced).to_numpy(), DROP_UNPRICED_PRODUCT)
    tx["drop"] = drop
    metered = (drop == None) & (quantity > METERED_QUANTITY)  # noqa: E711
    tx["metered"] = metered
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = np.where(metered, value, value / quantity)
    tx["unit_price"] = np.round(unit, 4)
    tx["unit_price"] = tx["unit_price"].where(~((tx["unit_price"] == 0) & (value > 0)), unit)
    tx["event_quantity"] = np.where(metered, 1, quantity)
    return tx


def _events(tx: pd.DataFrame) -> pd.DataFrame:
    """Kept transaction lines as ``Ordered Product`` events (contract fields + a few extras)."""
    kept = tx.loc[tx["drop"].isna()].copy()
    base = kept["basket_id"] + "-" + kept["product_id"]
    repeat = base.groupby(base).cumcount()
    event_id = base.where(repeat == 0, base + "-" + (repeat + 1).astype(str))
    metered = kept["metered"].to_numpy(bool)
    events = pd.DataFrame({
        "event_id": event_id.to_numpy(object),
        "event_time": rfc3339(kept["event_time"]).to_numpy(object),
        "user_id": kept["household_id"].to_numpy(object),
        "event_name": ORDER_EVENT,
        "sku": kept["product_id"].to_numpy(object),
        "quantity": kept["event_quantity"].astype("int64").to_numpy(),
        "price": kept["unit_price"].to_numpy(float),
        "order_id": kept["basket_id"].to_numpy(object),
        "store_id": kept["store_id"].to_numpy(object) if "store_id" in kept else None,
        "sales_value": kept["sales_value"].to_numpy(float),
        "metered_quantity": np.where(metered, kept["quantity"].to_numpy(float), np.nan),
        "_time": kept["event_time"].to_numpy(),
    })
    events["metered_quantity"] = events["metered_quantity"].astype("Int64")
    return events.sort_values(["_time", "event_id"], kind="stable").reset_index(drop=True)


def _catalog(source: Source, tx: pd.DataFrame) -> pd.DataFrame:
    """One row per product with a kept transaction line; price = median positive unit price."""
    kept = tx.loc[tx["drop"].isna()]
    priced = kept.loc[kept["sales_value"] > 0]
    stats = priced.groupby("product_id")["unit_price"].agg(["median", "size"])
    products = source.products.loc[source.products["product_id"].isin(stats.index)]
    products = products.drop_duplicates("product_id").sort_values("product_id")
    sku = products["product_id"]
    median = stats["median"].reindex(sku).to_numpy(float)
    price = np.where(np.round(median, 4) > 0, np.round(median, 4), median)
    unknown = pd.Series(UNKNOWN.upper(), index=products.index)
    part_type = _first_text(products["product_category"], products["department"],
                            default=unknown)
    title = _first_text(products["product_type"], products["product_category"],
                        products["department"], default="product " + sku)
    return pd.DataFrame({
        "sku": sku.to_numpy(object),
        "title": title.to_numpy(object),
        "part_type": part_type.to_numpy(object),
        "brand": products["brand"].to_numpy(object),
        "price": price,
        "image_url": sku.map(lambda s: IMAGE_URL.format(sku=s)).to_numpy(object),
        "tags": [[] for _ in range(len(products))],
        "is_universal": True,
        "variant_group": None,
        "department": products["department"].to_numpy(object),
        "manufacturer_id": products.get("manufacturer_id", pd.Series(None, index=products.index))
        .to_numpy(object),
        "package_size": products.get("package_size", pd.Series(None, index=products.index))
        .to_numpy(object),
        "priced_lines": stats["size"].reindex(sku).to_numpy(np.int64),
    }).reset_index(drop=True)


def _users(source: Source) -> pd.DataFrame:
    """Every household seen in any file; demographics where known, ``"unknown"`` otherwise."""
    ids = pd.concat([source.demographics["household_id"], source.transactions["household_id"],
                     source.campaigns["household_id"],
                     source.coupon_redemptions["household_id"]]).dropna().unique()
    ids = sorted(ids, key=lambda v: (len(v), v))  # numeric order for numeric ids
    demo = source.demographics.drop_duplicates("household_id").set_index("household_id")
    users = pd.DataFrame({
        "user_id": ids,
        "email": [f"household_{i}@{EMAIL_DOMAIN}" for i in ids],
        "updated_at": UPDATED_AT,
    })
    joined = demo.reindex(ids)
    for attr in DEMOGRAPHICS:
        users[attr] = joined[attr].astype(object).where(joined[attr].notna(), UNKNOWN).to_numpy(
            object)
    users["has_demographics"] = pd.Index(ids).isin(demo.index)
    return users


def _treatment_events(source: Source) -> Tuple[pd.DataFrame, Dict[str, int]]:
    """Campaign targeting → SENT at the campaign start; redemption → CLICKED at its date.

    Returns the events and the source rows not written, by reason.
    """
    drops: Dict[str, int] = {}

    def count(reason: str, mask) -> None:
        n = int(np.asarray(mask, bool).sum())
        if n:
            drops[reason] = drops.get(reason, 0) + n

    desc = source.campaign_descriptions.drop_duplicates("campaign_id").set_index("campaign_id")
    start = local_midnight_utc(desc["start_date"])
    sent = source.campaigns
    incomplete = sent[["campaign_id", "household_id"]].isna().any(axis=1)
    count("targeting row without campaign_id or household_id", incomplete)
    sent = sent.loc[~incomplete]
    repeated = sent.duplicated(["campaign_id", "household_id"])
    count("targeting row repeated", repeated)
    sent = sent.loc[~repeated]
    sent = pd.DataFrame({
        "event_id": ("sent-" + sent["campaign_id"] + "-" + sent["household_id"]).to_numpy(object),
        "_time": start.reindex(sent["campaign_id"]).to_numpy(),
        "user_id": sent["household_id"].to_numpy(object),
        "treatment_id": desc["campaign_type"].reindex(sent["campaign_id"]).to_numpy(object),
        "campaign_id": sent["campaign_id"].to_numpy(object),
        "kind": "SENT",
        "coupon_upc": None,
    })
    red = source.coupon_redemptions
    incomplete = red[["household_id", "campaign_id", "redemption_date"]].isna().any(axis=1)
    count("redemption without household_id, campaign_id or date", incomplete)
    red = red.loc[~incomplete]
    repeated = red.duplicated(["household_id", "coupon_upc", "campaign_id", "redemption_date"])
    count("redemption row repeated", repeated)
    red = red.loc[~repeated]
    upc = red["coupon_upc"].fillna("")
    clicked = pd.DataFrame({
        "event_id": ("redeemed-" + red["campaign_id"] + "-" + red["household_id"] + "-"
                     + upc + "-" + red["redemption_date"]).to_numpy(object),
        "_time": local_midnight_utc(red["redemption_date"]).to_numpy(),
        "user_id": red["household_id"].to_numpy(object),
        "treatment_id": desc["campaign_type"].reindex(red["campaign_id"]).to_numpy(object),
        "campaign_id": red["campaign_id"].to_numpy(object),
        "kind": "CLICKED",
        "coupon_upc": red["coupon_upc"].to_numpy(object),
    })
    out = pd.concat([sent, clicked], ignore_index=True)
    out["_time"] = pd.to_datetime(out["_time"], utc=True)
    unusable = out["_time"].isna() | out["treatment_id"].isna()
    count("campaign without a description or a parseable date", unusable)
    return out.loc[~unusable].reset_index(drop=True), drops


def convert(source: Source, holdout_days: int = HOLDOUT_DAYS,
            source_dir: Optional[str] = None) -> Converted:
    """All contract tables and the manifest; raises if the transaction rows do not reconcile."""
    if holdout_days < 1:
        raise ValueError("holdout_days must be >= 1")
    tx = _transactions(source)
    events = _events(tx)
    if events.empty:
        raise SourceError("no transaction line survived conversion; nothing to write")
    holdout_start, holdout_end = _holdout_window(events["_time"], holdout_days)
    in_holdout = (events["_time"] >= holdout_start).to_numpy(bool)
    history, holdout = events.loc[~in_holdout], events.loc[in_holdout]
    if history.empty:
        raise SourceError(f"the last {holdout_days} days hold every transaction; no history")

    catalog = _catalog(source, tx)
    users = _users(source)
    treatments, treatment_drops = _treatment_events(source)
    treatment_rows = len(source.campaigns) + len(source.coupon_redemptions)
    if len(treatments) + sum(treatment_drops.values()) != treatment_rows:
        raise AssertionError("campaign and redemption rows do not reconcile: "
                             f"{len(treatments)} + {treatment_drops} != {treatment_rows}")
    treatments = treatments.assign(event_time=rfc3339(treatments["_time"]))
    treatments = treatments.sort_values(["_time", "event_id"], kind="stable")

    dropped_tx = {r: int((tx["drop"] == r).sum()) for r in DROP_ORDER if (tx["drop"] == r).any()}
    n_tx = len(source.transactions)
    if len(history) + len(holdout) + sum(dropped_tx.values()) != n_tx:
        raise AssertionError("transaction rows do not reconcile: "
                             f"{len(history)} + {len(holdout)} + {dropped_tx} != {n_tx}")
    sold = set(tx.loc[tx["drop"].isna(), "product_id"])
    in_tx = set(source.transactions["product_id"].dropna())
    products = source.products["product_id"]
    event_cols = [c.name for c in SCHEMAS["events"]] + ["store_id", "sales_value",
                                                        "metered_quantity"]
    # The campaigns were not sent by a logging policy: the optional propensity and
    # allocation_version of a SENT are absent, not null.
    treat_cols = [c.name for c in SCHEMAS["treatment_events"]
                  if c.name != "reason" and (c.required or c.name in treatments.columns)] + [
        "coupon_upc"]
    tables = {
        "catalog": catalog,
        "fitment": pd.DataFrame({c.name: pd.Series(dtype=object) for c in SCHEMAS["fitment"]}),
        "users": users,
        "events": history[event_cols].reset_index(drop=True),
        "holdout_events": holdout[event_cols].reset_index(drop=True),
        "treatment_events": treatments[treat_cols].reset_index(drop=True),
    }
    metered = tx.loc[tx["drop"].isna() & tx["metered"]]
    kinds = tables["treatment_events"]["kind"].value_counts()
    manifest = {
        "dataset": DATASET,
        "source": source_dir,
        "timezone": TIMEZONE,
        "as_of": _iso(history["_time"].max()),
        "history_start": _iso(history["_time"].min()),
        "holdout_start": _iso(holdout_start),
        "holdout_end": _iso(holdout_end),
        "history_days": int(np.ceil((holdout_start - history["_time"].min()).total_seconds()
                                    / 86_400)),
        "holdout_days": holdout_days,
        "row_counts": {t: int(len(f)) for t, f in tables.items()},
        "source_rows": {name: int(len(getattr(source, name))) for name in SOURCE_FILES},
        "dropped": {
            "transactions": dropped_tx,
            "transactions_total": int(sum(dropped_tx.values())),
            "products": {
                "never in the transactions sample": int((~products.isin(in_tx)).sum()),
                "only on dropped transaction lines": int(
                    (products.isin(in_tx) & ~products.isin(sold)).sum()),
            },
            "treatment_events": treatment_drops,
            "demographics": {"household listed again": int(
                source.demographics["household_id"].duplicated().sum())},
            "products_listed_again": int(products.duplicated().sum()),
        },
        "reconciliation": {
            "transactions": n_tx, "events": int(len(history)),
            "holdout_events": int(len(holdout)),
            "dropped": int(sum(dropped_tx.values())),
            "campaigns + coupon_redemptions": treatment_rows,
            "treatment_events": int(len(treatments)),
            "treatment_rows_dropped": int(sum(treatment_drops.values())),
        },
        "metered_lines": int(len(metered)),
        "metered_products": int(metered["product_id"].nunique()),
        "users_with_demographics": int(users["has_demographics"].sum()),
        "users_without_demographics": int((~users["has_demographics"]).sum()),
        "orders": int(events["order_id"].nunique()),
        "history_orders": int(history["order_id"].nunique()),
        "holdout_orders": int(holdout["order_id"].nunique()),
        "holdout_buyers": int(holdout["user_id"].nunique()),
        "treatments": {"sent": int(kinds.get("SENT", 0)), "clicked": int(kinds.get("CLICKED", 0)),
                       "clicked_means": "coupon redeemed"},
        "mapping": {
            "user_id": "household_id", "order_id": "basket_id", "sku": "product_id",
            "part_type": "product_category", "title": "product_type",
            "price": "median of sales_value / quantity over the product's lines with "
                     "sales_value > 0",
            "treatment_id": "campaign_type",
            "SENT": "campaign targeting, at the campaign start date (New York midnight)",
            "CLICKED": "coupon redemption, at the redemption date (New York midnight)",
            "metered": f"lines with quantity > {METERED_QUANTITY}: quantity 1 at sales_value",
        },
    }
    return Converted(tables, manifest)


def _json_value(value):
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_jsonl(path: str, frame: pd.DataFrame) -> int:
    """Write a frame as JSON Lines (null for missing values); returns the rows written."""
    columns = list(frame.columns)
    values = [[_json_value(v) for v in frame[c].astype(object).tolist()] for c in columns]
    with open(path, "wb") as handle:
        for row in zip(*values):
            handle.write(orjson.dumps(dict(zip(columns, row))))
            handle.write(b"\n")
    return len(frame)


def write_dataset(converted: Converted, out_dir: str) -> dict:
    """Write every table as ``<table>.jsonl`` and ``world.json``; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    written = {t: write_jsonl(os.path.join(out_dir, f"{t}.jsonl"), converted.tables[t])
               for t in TABLES}
    manifest = {**converted.manifest, "format": "jsonl", "written_rows": written}
    with open(os.path.join(out_dir, "world.json"), "wb") as handle:
        handle.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest


def import_completejourney(source_dir: str, out_dir: str,
                           holdout_days: int = HOLDOUT_DAYS) -> dict:
    """Read, convert and write in one call; returns the written manifest."""
    converted = convert(read_source(source_dir), holdout_days, source_dir)
    return write_dataset(converted, out_dir)


def summary_lines(manifest: Mapping) -> List[str]:
    """A short human summary of a written manifest."""
    lines = [f"history {manifest['history_start']} .. as_of {manifest['as_of']}; holdout "
             f"{manifest['holdout_start']} .. {manifest['holdout_end']}"]
    for table in TABLES:
        lines.append(f"  {table:<17}{manifest['row_counts'][table]:>10,} rows")
    rec = manifest["reconciliation"]
    lines.append(f"transactions {rec['transactions']:,} = events {rec['events']:,} + holdout "
                 f"{rec['holdout_events']:,} + dropped {rec['dropped']:,}")
    for reason, n in manifest["dropped"]["transactions"].items():
        lines.append(f"  dropped {n:>6,}  {reason}")
    for reason, n in manifest["dropped"]["products"].items():
        lines.append(f"  products not in catalog {n:>6,}  {reason}")
    lines.append(f"metered (fuel) lines: {manifest['metered_lines']:,}; users with demographics "
                 f"{manifest['users_with_demographics']:,}, without "
                 f"{manifest['users_without_demographics']:,}")
    return lines
