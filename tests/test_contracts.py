"""Tests for models.contracts: JSON Lines parsing and per-table validation (SPEC §2)."""
import datetime as dt

import numpy as np
import pandas as pd
import pytest

from models.contracts import (EVENT_NAMES, MAX_PRICE, MAX_QUANTITY, ORDER_EVENT_NAMES,
                              TREATMENT_KINDS, parse_json_line, records_frame,
                              unknown_sku_mask, validate)

T0 = "2026-01-15T10:00:00Z"


def _event(**changes):
    row = {"event_id": "e1", "event_time": T0, "user_id": "u1", "event_name": "Viewed Product",
           "sku": "SKU-1", "quantity": 1, "price": 120.0}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not _DROP}


def _catalog(**changes):
    row = {"sku": "SKU-1", "title": "Header", "part_type": "Header", "brand": "Acme",
           "price": 120.0, "image_url": "https://img/1.jpg", "tags": ["performance"],
           "is_universal": False, "variant_group": None}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not _DROP}


def _user(**changes):
    row = {"user_id": "u1", "email": "Jane@Example.com", "make": "Ford", "model": "Mustang",
           "year": 2015, "updated_at": T0}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not _DROP}


def _treatment(**changes):
    row = {"event_id": "t1", "event_time": T0, "user_id": "u1", "treatment_id": "T1",
           "campaign_id": "C1", "kind": "SENT"}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()


def _check(table, records):
    return validate(table, records_frame(table, records))


def _reasons(table, records):
    """Reason per input position (None where valid)."""
    checked = _check(table, records)
    out = [None] * len(records)
    for pos, reason in zip(checked.bad_positions, checked.bad_reasons):
        out[int(pos)] = reason
    return out


def _single_reason(table, record):
    return _reasons(table, [record])[0]


# --- parse_json_line -------------------------------------------------------------

def test_parse_valid_object_str_and_bytes():
    assert parse_json_line('{"sku": "A", "price": 50.5}') == ({"sku": "A", "price": 50.5}, None)
    assert parse_json_line(b'{"sku": "A"}') == ({"sku": "A"}, None)


@pytest.mark.parametrize("line", ['{"sku": "A"', '{"sku": "A", "price": }', "", "not json",
                                  '{"sku": "A"} trailing', "[" * 5000 + "]" * 5000])
def test_parse_malformed_and_truncated(line):
    assert parse_json_line(line) == (None, "malformed JSON")


@pytest.mark.parametrize("line", [b"\xff\xfe{", b'{"sku": "\xff"}'])
def test_parse_refuses_bytes_that_are_not_utf8(line):
    assert parse_json_line(line) == (None, "not UTF-8 text")


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "42", "null", "true"])
def test_parse_non_object(line):
    assert parse_json_line(line) == (None, "record is not a JSON object")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_parses_and_validation_reports_the_price(literal):
    record, reason = parse_json_line(
        '{"sku": "A", "part_type": "Header", "price": %s}' % literal)
    assert reason is None
    assert not np.isfinite(record["price"])
    assert _single_reason("catalog", record) == "non-finite price"


def test_nan_price_on_optional_event_field_is_still_an_error():
    record, _ = parse_json_line(
        '{"event_id": "e", "event_time": "%s", "user_id": "u", '
        '"event_name": "Viewed Product", "sku": "S", "price": NaN}' % T0)
    checked = _check("events", [record])
    assert len(checked.rows) == 0
    assert list(checked.bad_reasons) == ["non-finite price"]


# --- events ------------------------------------------------------------------------

def test_good_events_are_typed():
    records = [_event(), _event(event_id="e2", event_time="2026-01-15T12:00:00+02:00",
                                event_name="Placed Order", order_id="o1", quantity=3)]
    checked = _check("events", records)
    assert len(checked.bad_positions) == 0
    rows = checked.rows
    assert isinstance(rows["event_time"].dtype, pd.DatetimeTZDtype)
    assert str(rows["event_time"].dt.tz) == "UTC"
    # the +02:00 offset is converted, not dropped
    assert rows.loc[1, "event_time"] == pd.Timestamp("2026-01-15T10:00:00Z")
    assert rows["event_time"].iloc[0].to_pydatetime() == dt.datetime(
        2026, 1, 15, 10, tzinfo=dt.timezone.utc)
    assert str(rows["quantity"].dtype) == "Int64"
    assert rows["quantity"].tolist() == [1, 3]
    assert rows["price"].dtype == np.float64


def test_optional_event_fields_may_be_absent():
    record = _event(quantity=_DROP, price=_DROP)
    checked = _check("events", [record])
    assert len(checked.rows) == 1
    assert pd.isna(checked.rows.loc[0, "quantity"])
    assert np.isnan(checked.rows.loc[0, "price"])


@pytest.mark.parametrize("field", ["event_id", "event_time", "user_id", "event_name", "sku"])
def test_missing_required_event_field(field):
    assert _single_reason("events", _event(**{field: _DROP})) == f"missing {field}"


@pytest.mark.parametrize("field", ["user_id", "sku"])
def test_blank_string_counts_as_missing(field):
    assert _single_reason("events", _event(**{field: "   "})) == f"missing {field}"


@pytest.mark.parametrize("changes, reason", [
    ({"price": "120.0"}, "wrong type for price"),
    ({"price": True}, "wrong type for price"),
    ({"price": [1]}, "wrong type for price"),
    ({"quantity": "2"}, "wrong type for quantity"),
    ({"quantity": False}, "wrong type for quantity"),
    ({"event_id": 17}, "wrong type for event_id"),
    ({"sku": 12345}, "wrong type for sku"),
    ({"price": -0.01}, "negative price"),
    ({"price": MAX_PRICE * 2}, "absurd price"),
    ({"quantity": -1}, "negative quantity"),
    ({"quantity": MAX_QUANTITY + 1}, "absurd quantity"),
    ({"quantity": 1.5}, "non-integer quantity"),
    ({"event_name": "Bought Stuff"}, "unknown event_name"),
    ({"event_name": "viewed product"}, "unknown event_name"),
    ({"event_time": "yesterday"}, "malformed event_time"),
    ({"event_time": "2026-13-01T00:00:00Z"}, "malformed event_time"),
    ({"event_time": 1767225600}, "wrong type for event_time"),
])
def test_bad_event_fields_have_specific_reasons(changes, reason):
    assert _single_reason("events", _event(**changes)) == reason


def test_boundary_price_and_quantity_pass():
    checked = _check("events", [_event(price=0.0, quantity=0),
                                _event(event_id="e2", price=MAX_PRICE, quantity=MAX_QUANTITY),
                                _event(event_id="e3", quantity=2.0)])
    assert len(checked.bad_positions) == 0
    assert checked.rows["quantity"].tolist() == [0, MAX_QUANTITY, 2]


@pytest.mark.parametrize("name", ORDER_EVENT_NAMES)
def test_order_event_needs_order_id(name):
    assert _single_reason("events", _event(event_name=name)) == "order event without order_id"
    assert _single_reason("events", _event(event_name=name, order_id="o1")) is None


@pytest.mark.parametrize("name", ["Viewed Product", "Cart Update"])
def test_intent_event_needs_no_order_id(name):
    assert name in EVENT_NAMES
    assert _single_reason("events", _event(event_name=name)) is None


def test_bad_rows_keep_input_positions_and_good_rows_keep_order():
    records = [_event(event_id="a"), _event(event_id="b", price="x"), _event(event_id="c"),
               _event(event_id="d", event_name="??"), _event(event_id="e")]
    checked = _check("events", records)
    assert checked.bad_positions.tolist() == [1, 3]
    assert checked.bad_reasons.tolist() == ["wrong type for price", "unknown event_name"]
    assert checked.rows["event_id"].tolist() == ["a", "c", "e"]


def test_first_reason_wins():
    # both the id and the price are wrong: the first contract column reports
    assert _single_reason("events", _event(event_id=_DROP, price="x")) == "missing event_id"


def test_extra_fields_pass_through():
    checked = _check("events", [_event(campaign="spring", utm={"a": 1})])
    assert checked.rows.loc[0, "campaign"] == "spring"
    assert checked.rows.loc[0, "utm"] == {"a": 1}


def test_empty_batch():
    checked = _check("events", [])
    assert len(checked.rows) == 0 and len(checked.bad_positions) == 0
    assert {"event_id", "event_time", "order_id"} <= set(checked.rows.columns)


def test_holdout_events_share_the_events_contract():
    assert _single_reason("holdout_events", _event(event_name="nope")) == "unknown event_name"


# --- catalog ------------------------------------------------------------------------

def test_good_catalog_row_typed():
    checked = _check("catalog", [_catalog(tags=["Refurbished ", "OEM"]),
                                 _catalog(sku="SKU-2", tags=_DROP, is_universal=_DROP)])
    assert len(checked.bad_positions) == 0
    assert checked.rows.loc[0, "tags"] == ("refurbished", "oem")
    assert checked.rows.loc[1, "tags"] == ()
    assert checked.rows["is_universal"].tolist() == [False, False]


@pytest.mark.parametrize("changes, reason", [
    ({"sku": _DROP}, "missing sku"),
    ({"part_type": _DROP}, "missing part_type"),
    ({"price": _DROP}, "missing price"),
    ({"price": None}, "missing price"),
    ({"price": "99"}, "wrong type for price"),
    ({"price": False}, "wrong type for price"),
    ({"price": -5.0}, "negative price"),
    ({"price": 5e9}, "absurd price"),
    ({"price": 0}, "zero price"),
    ({"tags": "refurbished"}, "wrong type for tags"),
    ({"tags": ["ok", 3]}, "wrong type for tags"),
    ({"is_universal": "yes"}, "wrong type for is_universal"),
    ({"is_universal": 1}, "wrong type for is_universal"),
])
def test_bad_catalog_rows(changes, reason):
    assert _single_reason("catalog", _catalog(**changes)) == reason


# --- fitment ------------------------------------------------------------------------

@pytest.mark.parametrize("changes, reason", [
    ({"year": None}, "missing year"),
    ({"year": "2015"}, "wrong type for year"),
    ({"year": 2015.5}, "non-integer year"),
    ({"year": -1}, "implausible year"),
    ({"year": 2101}, "implausible year"),
    ({"make": None}, "missing make"),
])
def test_bad_fitment_rows(changes, reason):
    row = {"sku": "SKU-1", "make": "Ford", "model": "Mustang", "year": 2015}
    row.update(changes)
    assert _single_reason("fitment", row) == reason


def test_fitment_year_is_nullable_int():
    checked = _check("fitment", [{"sku": "S", "make": "Ford", "model": "M", "year": 2015.0}])
    assert str(checked.rows["year"].dtype) == "Int64"
    assert checked.rows.loc[0, "year"] == 2015


# --- users --------------------------------------------------------------------------

def test_good_users_typed_with_lowercase_email():
    checked = _check("users", [_user(), _user(user_id="u2", year=None, make=None,
                                              updated_at=None)])
    assert len(checked.bad_positions) == 0
    assert checked.rows["email_lower"].tolist() == ["jane@example.com", "jane@example.com"]
    assert checked.rows["email"].tolist() == ["Jane@Example.com", "Jane@Example.com"]
    assert str(checked.rows["year"].dtype) == "Int64"
    assert checked.rows.loc[0, "year"] == 2015 and pd.isna(checked.rows.loc[1, "year"])
    assert str(checked.rows["updated_at"].dt.tz) == "UTC"


@pytest.mark.parametrize("changes, reason", [
    ({"email": "not-an-email"}, "malformed email"),
    ({"email": _DROP}, "missing email"),
    ({"email": 42}, "wrong type for email"),
    ({"user_id": _DROP}, "missing user_id"),
    ({"year": 1999.5}, "non-integer year"),
    ({"year": "2015"}, "wrong type for year"),
    ({"year": 3000}, "implausible year"),
    ({"updated_at": "last tuesday"}, "malformed updated_at"),
])
def test_bad_users(changes, reason):
    assert _single_reason("users", _user(**changes)) == reason


# --- treatment events ---------------------------------------------------------------

@pytest.mark.parametrize("kind", TREATMENT_KINDS)
def test_known_treatment_kinds_pass(kind):
    assert _single_reason("treatment_events", _treatment(kind=kind)) is None


@pytest.mark.parametrize("changes, reason", [
    ({"kind": "OPENED"}, "unknown kind"),
    ({"kind": "sent"}, "unknown kind"),
    ({"campaign_id": _DROP}, "missing campaign_id"),
    ({"treatment_id": None}, "missing treatment_id"),
    ({"event_time": "soon"}, "malformed event_time"),
])
def test_bad_treatment_events(changes, reason):
    assert _single_reason("treatment_events", _treatment(**changes)) == reason


# --- parquet-typed input goes through the same checks --------------------------------

def test_typed_frame_with_nan_price_is_reported():
    frame = pd.DataFrame({"sku": ["A", "B"], "part_type": ["Header", "Intake"],
                          "price": [100.0, np.nan]})
    checked = validate("catalog", frame)
    assert checked.bad_positions.tolist() == [1]
    assert checked.bad_reasons.tolist() == ["non-finite price"]


def test_typed_datetime_column_accepted():
    frame = pd.DataFrame({"event_id": ["e"], "event_time": pd.to_datetime([T0], utc=True),
                          "user_id": ["u"], "event_name": ["Cart Update"], "sku": ["S"]})
    checked = validate("events", frame)
    assert len(checked.rows) == 1
    assert checked.rows.loc[0, "event_time"] == pd.Timestamp(T0)


# --- unknown_sku_mask ---------------------------------------------------------------

def test_unknown_sku_mask():
    known = np.array(["A", "B", "C"])
    mask = unknown_sku_mask(pd.Series(["A", "Z", None, "C", "a"]), known)
    assert mask.tolist() == [False, True, True, False, True]
    assert unknown_sku_mask(pd.Series([], dtype=object), known).tolist() == []
    assert unknown_sku_mask(pd.Series(["A"]), np.array([], dtype=str)).tolist() == [True]
