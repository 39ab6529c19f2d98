"""SPEC §2 data contracts: parse raw records and split them into valid rows and dead letters.

Validation is vectorised over a pandas batch so that the same checks serve JSON
Lines (parsed here) and Parquet (typed by the file) at millions of rows. A bad
row is never dropped: its position comes back with a reason so the caller can
write the original record to the dead-letter table.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import orjson
import pandas as pd

VIEW = "Viewed Product"
CART = "Cart Update"
ORDER_EVENT_NAMES = ("Placed Order", "Ordered Product", "Consumer Website Order")
EVENT_NAMES = (VIEW, CART) + ORDER_EVENT_NAMES
TREATMENT_KINDS = ("SENT", "DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED")

# Largest plausible unit price and quantity; beyond them a value is a typo or an attack.
MAX_PRICE = 1_000_000.0
MAX_QUANTITY = 10_000
# A contract record is a few hundred bytes; a megabyte is an attack or a broken export.
MAX_RECORD_BYTES = 1_000_000
# Event times outside this range are clock errors, not history.
EARLIEST_TIME = pd.Timestamp("1990-01-01", tz="UTC")
LATEST_TIME = pd.Timestamp("2100-01-01", tz="UTC")


# RFC 3339 date-time (section 5.6) with an explicit offset: "Z" or "+hh:mm". Local times,
# "now", "2026", "2026/02/20 10:00" and "03/02/2026" are refused: their meaning is a guess.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(text: object) -> Optional[pd.Timestamp]:
    """A UTC timestamp from an RFC 3339 date-time with an explicit offset, else None.

    >>> parse_rfc3339("2026-02-20T10:00:00+01:00")
    Timestamp('2026-02-20 09:00:00+0000', tz='UTC')
    >>> [parse_rfc3339(t) for t in ("2026-02-20T10:00:00", "now", "2026", "03/02/2026")]
    [None, None, None, None]
    """
    if not isinstance(text, str) or not _RFC3339.match(text):
        return None
    try:
        return pd.Timestamp(text).tz_convert("UTC")
    except (ValueError, OverflowError):
        return None  # e.g. month 13 or 30 February


@dataclass(frozen=True)
class Column:
    """One contract field: its name, kind and whether a row may omit it."""

    name: str
    kind: str  # str | float | int | bool | time | tags
    required: bool = True


SCHEMAS: Dict[str, Tuple[Column, ...]] = {
    "catalog": (
        Column("sku", "str"), Column("title", "str", False), Column("part_type", "str"),
        Column("brand", "str", False), Column("price", "float"),
        Column("image_url", "str", False), Column("tags", "tags", False),
        Column("is_universal", "bool", False), Column("variant_group", "str", False),
    ),
    "fitment": (
        Column("sku", "str"), Column("make", "str"), Column("model", "str"),
        Column("year", "int"),
    ),
    "users": (
        Column("user_id", "str"), Column("email", "str"), Column("make", "str", False),
        Column("model", "str", False), Column("year", "int", False),
        Column("updated_at", "time", False),
    ),
    "events": (
        Column("event_id", "str"), Column("event_time", "time"), Column("user_id", "str"),
        Column("event_name", "str"), Column("sku", "str"), Column("quantity", "int", False),
        Column("price", "float", False), Column("order_id", "str", False),
    ),
    "treatment_events": (
        Column("event_id", "str"), Column("event_time", "time"), Column("user_id", "str"),
        Column("treatment_id", "str"), Column("campaign_id", "str"), Column("kind", "str"),
        Column("reason", "str", False),
    ),
}
SCHEMAS["holdout_events"] = SCHEMAS["events"]


class Validated(NamedTuple):
    """A batch split in two: typed valid rows, and positions of bad rows with reasons."""

    rows: pd.DataFrame
    bad_positions: np.ndarray
    bad_reasons: np.ndarray


def parse_json_line(line: str | bytes) -> Tuple[Optional[dict], Optional[str]]:
    """Parse one JSON Lines record; returns (record, None) or (None, reason).

    orjson is fast but strict; the standard library is tried second so that a
    ``NaN`` price is reported as a bad price rather than as malformed JSON.
    Bytes that are not UTF-8 and records over ``MAX_RECORD_BYTES`` are refused
    before parsing.
    """
    if len(line) > MAX_RECORD_BYTES:
        return None, "oversized record"
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not UTF-8 text"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            record = json.loads(line)
        except (ValueError, TypeError, RecursionError):
            return None, "malformed JSON"
    if not isinstance(record, dict):
        return None, "record is not a JSON object"
    return record, None


def records_frame(table: str, records: Sequence[dict]) -> pd.DataFrame:
    """Column-wise frame of parsed records, contract columns first (extras kept)."""
    names = [c.name for c in SCHEMAS[table]]
    names += sorted(set().union(*map(dict.keys, records)).difference(names))
    # Object columns keep None (absent) apart from NaN (a bad value).
    return pd.DataFrame({n: pd.Series([r.get(n) for r in records], dtype=object)
                         for n in names})


def _missing(value) -> bool:
    """None, NaN, pd.NA or NaT: a value that is simply absent."""
    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, float) and math.isnan(value))


def _as_text(values: pd.Series) -> Tuple[pd.Series, np.ndarray]:
    """Strings stripped of surrounding space; mask of values that are not strings."""
    raw = values.to_numpy(object)
    text = np.array([(v.strip() or None) if isinstance(v, str) else None for v in raw] or [],
                    dtype=object)
    wrong = np.array([not isinstance(v, str) and not _missing(v) for v in raw] or [], dtype=bool)
    return pd.Series(text, index=values.index, dtype=object), wrong


def _as_number(values: pd.Series) -> Tuple[pd.Series, np.ndarray, np.ndarray]:
    """Float values; masks of wrong types (text, bools) and of non-finite numbers."""
    obj = values.astype(object)
    # NaN is a value here (a NaN price is an error); only None is missing.
    present = obj.map(lambda v: v is not None).to_numpy(bool)
    # bool is an int in Python, but True is not a price.
    numeric = obj.map(lambda v: isinstance(v, (int, float, np.integer, np.floating))
                      and not isinstance(v, (bool, np.bool_))).to_numpy(bool)
    number = pd.to_numeric(obj.where(numeric, None), errors="coerce").astype(float)
    finite = np.isfinite(number.to_numpy())
    nonfinite = numeric & ~finite & present
    return number, present & ~numeric, nonfinite


def _as_time(values: pd.Series) -> Tuple[pd.Series, np.ndarray]:
    """UTC timestamps from RFC 3339 strings (or already typed); mask of unparseable values."""
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = pd.to_datetime(values, utc=True)
    else:
        stamps = pd.to_datetime(values.astype(object).where(
            values.map(lambda v: isinstance(v, str)), None),
            utc=True, errors="coerce", format="ISO8601")
    bad = values.notna().to_numpy(bool) & stamps.isna().to_numpy(bool)
    return stamps.astype("datetime64[us, UTC]"), bad


def _as_tags(values: pd.Series) -> Tuple[pd.Series, np.ndarray]:
    """Tags as tuples of lower-case strings; mask of values that are not lists of strings."""
    def convert(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ()
        if isinstance(v, (list, tuple, np.ndarray)) and all(isinstance(t, str) for t in v):
            return tuple(t.strip().lower() for t in v)
        return None
    tags = values.astype(object).map(convert)
    return tags, tags.isna().to_numpy(bool)


def _as_bool(values: pd.Series) -> Tuple[pd.Series, np.ndarray]:
    """Booleans (missing means False); mask of values that are not booleans."""
    obj = values.astype(object)
    ok = obj.map(lambda v: v is None or isinstance(v, (bool, np.bool_))
                 or (isinstance(v, float) and math.isnan(v))).to_numpy(bool)
    return obj.map(lambda v: bool(v) if isinstance(v, (bool, np.bool_)) else False).astype(bool), ~ok


class _Reasons:
    """First reason per row wins; later checks do not overwrite it."""

    def __init__(self, n: int):
        self.reasons = np.full(n, None, dtype=object)

    def add(self, mask: np.ndarray, reason: str) -> None:
        self.reasons[np.asarray(mask, bool) & (self.reasons == None)] = reason  # noqa: E711

    @property
    def bad(self) -> np.ndarray:
        return self.reasons != None  # noqa: E711


def validate(table: str, frame: pd.DataFrame) -> Validated:
    """Type every contract column of ``table`` and find the rows that break the contract.

    Checks: required fields present, right types, finite non-negative sane
    prices and quantities, known event names and kinds, order events carry an
    ``order_id``, timestamps parse, e-mails contain ``@``. Extra fields pass
    through untouched.
    """
    frame = frame.reset_index(drop=True)
    out = frame.copy()
    reasons = _Reasons(len(frame))
    for column in SCHEMAS[table]:
        values = frame[column.name] if column.name in frame.columns else pd.Series(
            [None] * len(frame), dtype=object)
        if column.kind == "str":
            typed, wrong = _as_text(values)
        elif column.kind in ("float", "int"):
            typed, wrong, nonfinite = _as_number(values)
            reasons.add(nonfinite, f"non-finite {column.name}")
            bad_range = typed.to_numpy() < 0
            limit = MAX_PRICE if column.kind == "float" else MAX_QUANTITY
            if column.name == "year":
                limit = 2100
            reasons.add(bad_range, f"negative {column.name}")
            reasons.add(typed.to_numpy() > limit, f"absurd {column.name}")
            if column.kind == "int":
                number = typed.to_numpy()
                reasons.add(np.isfinite(number) & (number != np.round(number)),
                            f"non-integer {column.name}")
                # Out-of-range values are already refused; keep them from overflowing int64.
                typed = typed.where(typed.abs() <= limit).round().astype("Int64")
        elif column.kind == "time":
            typed, wrong = _as_time(values)
            reasons.add(typed.notna().to_numpy(bool)
                        & ((typed < EARLIEST_TIME) | (typed >= LATEST_TIME)).to_numpy(bool),
                        f"implausible {column.name}")
        elif column.kind == "tags":
            typed, wrong = _as_tags(values)
        else:
            typed, wrong = _as_bool(values)
        reasons.add(wrong, f"wrong type for {column.name}")
        if column.required:
            missing = values.astype(object).map(lambda v: v is None).to_numpy(bool) | (
                typed.isna().to_numpy(bool) & ~wrong)
            reasons.add(missing, f"missing {column.name}")
        out[column.name] = typed
    _check_table_rules(table, out, reasons)
    bad = reasons.bad
    positions = np.flatnonzero(bad)
    return Validated(out.loc[~bad].reset_index(drop=True), positions, reasons.reasons[positions])


def _check_table_rules(table: str, frame: pd.DataFrame, reasons: _Reasons) -> None:
    """Cross-field rules of one table, after the columns are typed."""
    if table in ("events", "holdout_events"):
        names = frame["event_name"]
        reasons.add(~names.isin(EVENT_NAMES).to_numpy(bool), "unknown event_name")
        is_order = names.isin(ORDER_EVENT_NAMES).to_numpy(bool)
        reasons.add(is_order & frame["order_id"].isna().to_numpy(bool),
                    "order event without order_id")
    elif table == "treatment_events":
        reasons.add(~frame["kind"].isin(TREATMENT_KINDS).to_numpy(bool), "unknown kind")
    elif table == "users":
        email = frame["email"].astype(object)
        reasons.add(email.notna().to_numpy(bool)
                    & ~email.map(lambda e: isinstance(e, str) and "@" in e).to_numpy(bool),
                    "malformed email")
        frame["email_lower"] = email.map(lambda e: e.lower() if isinstance(e, str) else None)
    elif table == "catalog":
        reasons.add(frame["price"].to_numpy() == 0, "zero price")


def unknown_sku_mask(skus: pd.Series, known) -> np.ndarray:
    """Rows whose SKU is not among the catalogue's SKUs (a hash lookup per row)."""
    return ~skus.isin(known).to_numpy(bool)


def to_record_json(frame: pd.DataFrame, positions: np.ndarray) -> List[str]:
    """Selected rows as JSON text, for dead letters of a typed (Parquet) source."""
    if len(positions) == 0:
        return []
    rows = frame.iloc[positions]
    return [json.dumps(r, default=str, allow_nan=True) for r in rows.to_dict("records")]
