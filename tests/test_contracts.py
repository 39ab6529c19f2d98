"""Tests for models.contracts: JSON Lines parsing and per-table validation (SPEC §2)."""
import datetime as dt
import json

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


# --- #13: strict records -------------------------------------------------------------

from models.config import InputConfig  # noqa: E402
from models.contracts import (is_email, parse_rfc3339, storable_text,  # noqa: E402
                              strip_bom, vehicle_spelling)

_STRING_FIELDS = {
    "catalog": (_catalog, ["sku", "title", "part_type", "brand", "image_url", "variant_group"]),
    "users": (_user, ["user_id", "email", "make", "model"]),
    "events": (_event, ["event_id", "user_id", "sku", "order_id"]),
    "treatment_events": (_treatment, ["event_id", "user_id", "treatment_id", "campaign_id"]),
}
_STRING_CASES = [(table, field) for table, (_, fields) in _STRING_FIELDS.items()
                 for field in fields]


@pytest.mark.parametrize("table, field", _STRING_CASES)
def test_lone_surrogate_in_any_string_field_is_a_dead_letter_not_a_crash(table, field):
    make_row, _ = _STRING_FIELDS[table]
    line = json.dumps(make_row(**{field: "x\ud800y"}))  # ensure_ascii: the JSON text "\ud800"
    assert "\\ud800" in line
    assert parse_json_line(line) == (None, f"invalid unicode in {field}")
    # a frame that holds one anyway (BigQuery rows, a caller's own frame) is refused too
    assert _single_reason(table, make_row(**{field: "x\udfffy"})) == f"invalid unicode in {field}"


def test_lone_surrogate_in_an_extra_field_or_nested_value_is_refused():
    assert parse_json_line('{"sku": "A", "utm": {"a": ["\\ud83d"]}}') == (
        None, "invalid unicode in extra field")
    assert parse_json_line('{"sku": "A", "\\ud800": 1}') == (None, "invalid unicode in extra field")
    # a proper pair is one character, not an error
    record, reason = parse_json_line('{"sku": "A", "title": "\\ud83d\\ude97"}')
    assert reason is None and record["title"] == "\U0001F697"


def test_dead_letter_text_is_storable():
    assert storable_text("x\ud800") == "x\\ud800"
    storable_text("x\ud800").encode("utf-8")  # no UnicodeEncodeError
    assert storable_text("plain é") == "plain é"


@pytest.mark.parametrize("table, field", _STRING_CASES)
@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b", "\n"])
def test_control_characters_are_refused_in_every_contract_string(table, field, char):
    make_row, _ = _STRING_FIELDS[table]
    value = f"ab{char}cd" if field != "email" else f"a{char}b@x.com"
    assert _single_reason(table, make_row(**{field: value})) == f"control character in {field}"


def test_ansi_escape_in_a_sku_never_reaches_the_rows():
    checked = _check("events", [_event(sku="\x1b[31mAA001R\x1b[0m"), _event(event_id="e2")])
    assert checked.bad_reasons.tolist() == ["control character in sku"]
    assert checked.rows["sku"].tolist() == ["SKU-1"]


def test_control_characters_in_tags_are_refused():
    assert _single_reason("catalog", _catalog(tags=["ok", "bad\x00tag"])) == "wrong type for tags"


@pytest.mark.parametrize("table, field", [
    ("catalog", "sku"), ("catalog", "variant_group"), ("events", "event_id"),
    ("events", "user_id"), ("events", "sku"), ("events", "order_id"),
    ("treatment_events", "treatment_id"), ("treatment_events", "campaign_id"),
    ("users", "user_id")])
@pytest.mark.parametrize("padding", [" {} ", "{} ", " {}", "\u3000{}", "{}\u00a0"])
def test_padded_identifiers_are_refused_not_stripped(table, field, padding):
    make_row = {"catalog": _catalog, "events": _event, "treatment_events": _treatment,
                "users": _user}[table]
    assert _single_reason(table, make_row(**{field: padding.format("AA001R")})) == (
        f"padded {field}")


def test_identifiers_are_kept_exactly_and_inner_spaces_are_allowed():
    checked = _check("events", [_event(sku="AA 001R"), _event(event_id="e2", sku="aa001r")])
    assert checked.rows["sku"].tolist() == ["AA 001R", "aa001r"]
    # blank is still "missing", not "padded"
    assert _single_reason("events", _event(sku="   ")) == "missing sku"


def test_free_text_is_still_trimmed():
    checked = _check("catalog", [_catalog(title="  Header  ", part_type=" Header ")])
    assert checked.rows.loc[0, "title"] == "Header"
    assert checked.rows.loc[0, "part_type"] == "Header"


@pytest.mark.parametrize("line, reason", [
    ('{"sku": "A", "sku": "B"}', "duplicate key sku"),
    ('{"sku" : "A", "price": 1, "sku":"B"}', "duplicate key sku"),
    ('{"sku": "A", "\\u0073ku": "B"}', "duplicate key sku"),
    ('{"sku": "A", "x": {"k": 1, "k": 2}}', "duplicate key extra field"),
    ('{"sku": "A", "zz": 1, "zz": 2}', "duplicate key extra field"),
    ('{"sku": "A", "price": NaN, "sku": "B"}', "duplicate key sku"),
])
def test_duplicate_json_keys_are_refused(line, reason):
    assert parse_json_line(line) == (None, reason)
    assert parse_json_line(line.encode()) == (None, reason)


@pytest.mark.parametrize("line", [
    '{"sku": "sku", "title": "\\"sku\\": 1"}', '{"a": {"sku": 1}, "sku": 2}',
    '{"sku": "A", "title": "18\\" wheel"}', '{"sku"\t:\t"A", "price" : 2}'])
def test_lines_that_only_look_like_repeats_parse(line):
    record, reason = parse_json_line(line)
    assert reason is None and record["sku"] in ("sku", 2, "A")


def test_bom_is_stripped_once_where_a_line_starts():
    assert strip_bom(b'\xef\xbb\xbf{"sku": "A"}') == b'{"sku": "A"}'
    assert strip_bom(b'{"sku": "A"}') == b'{"sku": "A"}'
    assert parse_json_line(strip_bom(b'\xef\xbb\xbf{"sku": "A"}')) == ({"sku": "A"}, None)


# RFC 3339 with an explicit offset, for every time field.
@pytest.mark.parametrize("text", [
    "now", "today", "2026/02/20 10:00", "2026", "2026-02-20", "2026-02-20T10:00:00",
    "2026-02-20 10:00:00", "03/02/2026", "2026-02-20T10:00Z", "2026-02-20T10:00:00+0100",
    "2026-02-20T10:00:00Z\n", "20260220T100000Z", "2026-02-30T10:00:00Z", "Fri, 20 Feb 2026"])
def test_times_without_rfc3339_offset_are_refused(text):
    assert parse_rfc3339(text) is None
    assert _single_reason("events", _event(event_time=text)) == "malformed event_time"
    assert _single_reason("users", _user(updated_at=text)) == "malformed updated_at"
    assert _single_reason("treatment_events", _treatment(event_time=text)) == (
        "malformed event_time")


@pytest.mark.parametrize("text, utc", [
    ("2026-02-20T10:00:00Z", "2026-02-20T10:00:00Z"),
    ("2026-02-20t10:00:00.123456z", "2026-02-20T10:00:00.123456Z"),
    ("2026-02-20 10:00:00+01:00", "2026-02-20T09:00:00Z"),
    ("2026-02-20T10:00:00.5-05:30", "2026-02-20T15:30:00.5Z")])
def test_rfc3339_times_agree_with_parse_rfc3339(text, utc):
    checked = _check("events", [_event(event_time=text)])
    assert checked.rows.loc[0, "event_time"] == pd.Timestamp(utc) == parse_rfc3339(text)


def test_typed_naive_timestamps_stay_accepted_as_utc():
    frame = pd.DataFrame({"event_id": ["e"], "event_time": pd.to_datetime(["2026-01-15 10:00"]),
                          "user_id": ["u"], "event_name": ["Cart Update"], "sku": ["S"]})
    assert validate("events", frame).rows.loc[0, "event_time"] == pd.Timestamp(T0)


@pytest.mark.parametrize("email", [
    "victim@x.com\r\nBcc: all@x.com", "a@b@c.com", '"bob" <bob@x.com>', "bob <bob@x.com>",
    "a" * 1990 + "@example.com", "bob@x.com\x00", "bob smith@x.com", "bob@x.com,eve@y.com",
    "bob@localhost", "bob@x..com", "bob@-x.com", "bob@x-.com", ".bob@x.com", "bob.@x.com",
    "bob..b@x.com", "@x.com", "bob@", "bob@x.com ", "bob@exa mple.com", "bob@x_y.com",
    "bób@x.com", "bob@x.com.", '"bob"@x.com', "bob(c)@x.com"])
def test_malformed_emails_are_refused(email):
    assert not is_email(email)
    assert _single_reason("users", _user(email=email)) in (
        "malformed email", "control character in email")


@pytest.mark.parametrize("email", [
    "Jane@Example.com", "JANE.DOE+cars@mail.example.co.uk", "o'neil@x.com", "a@xn--bcher-kva.de",
    "x_y-z{1}@sub-domain.example.org", "a" * 64 + "@" + "b" * 63 + ".com"])
def test_addr_specs_in_any_case_pass(email):
    assert is_email(email)
    checked = _check("users", [_user(email=email)])
    assert checked.rows.loc[0, "email_lower"] == email.lower()


def test_email_over_254_characters_is_refused():
    email = "a@" + ".".join(["b" * 60] * 5) + ".com"
    assert len(email) > 254 and not is_email(email)


@pytest.mark.parametrize("year", [0, 1, 69, 1899, 2101])
@pytest.mark.parametrize("table", ["users", "fitment"])
def test_implausible_vehicle_years_are_refused(table, year):
    row = _user(year=year) if table == "users" else {
        "sku": "S", "make": "Ford", "model": "Mustang", "year": year}
    assert _single_reason(table, row) == "implausible year"


def test_vehicle_year_range_is_configurable():
    limits = InputConfig(min_vehicle_year=1960, max_vehicle_year=2030)
    rows = [_user(year=1955), _user(user_id="u2", year=1965), _user(user_id="u3", year=2031)]
    checked = validate("users", records_frame("users", rows), limits)
    assert checked.bad_reasons.tolist() == ["implausible year", "implausible year"]
    assert checked.rows["user_id"].tolist() == ["u2"]


def test_wholesale_quantity_passes_with_a_raised_cap():
    line = _event(event_name="Placed Order", order_id="o1", quantity=50_000)
    assert _single_reason("events", line) == "absurd quantity"
    raised = InputConfig(max_quantity=100_000)
    checked = validate("events", records_frame("events", [line]), raised)
    assert len(checked.bad_positions) == 0 and checked.rows["quantity"].tolist() == [50_000]


def test_price_cap_is_configurable():
    rows = [_catalog(price=2_000.0)]
    assert len(validate("catalog", records_frame("catalog", rows)).bad_positions) == 0
    checked = validate("catalog", records_frame("catalog", rows), InputConfig(max_price=1_000.0))
    assert checked.bad_reasons.tolist() == ["absurd price"]


@pytest.mark.parametrize("name", ORDER_EVENT_NAMES)
def test_order_lines_need_a_positive_quantity(name):
    assert _single_reason("events", _event(event_name=name, order_id="o", quantity=0)) == (
        "zero quantity on order")
    assert _single_reason("events", _event(event_name=name, order_id="o", quantity=-2)) == (
        "negative quantity")
    assert _single_reason("events", _event(event_name=name, order_id="o", quantity=1)) is None
    assert _single_reason("events", _event(event_name=name, order_id="o", quantity=_DROP)) is None


def test_make_and_model_are_matched_case_insensitively_in_users_and_fitment():
    users = _check("users", [_user(make="ford", model="mustang  gt"),
                             _user(user_id="u2", make=" FORD ", model="Mustang GT")]).rows
    fitment = _check("fitment", [{"sku": "S", "make": "Ford", "model": "MUSTANG gt",
                                  "year": 2015}]).rows
    assert users["make"].tolist() == ["FORD", "FORD"] == fitment["make"].tolist() * 2
    assert users["model"].tolist() == ["MUSTANG GT"] * 2 == fitment["model"].tolist() * 2
    assert vehicle_spelling("Straße") == vehicle_spelling("STRASSE")
    assert _single_reason("fitment", {"sku": "S", "make": "  ", "model": "M", "year": 2015}) == (
        "missing make")


def test_validate_keeps_default_limits_for_callers_that_pass_none():
    assert validate("events", records_frame("events", [_event()])).rows["sku"].tolist() == ["SKU-1"]


def test_a_repeated_key_is_found_in_a_batch_of_clean_lines():
    from models.contracts import parse_json_lines
    clean = [json.dumps(_event(event_id=f"e{i}")).encode() for i in range(50)]
    lines = clean[:20] + [b'{"event_id": "d", "sku": "A", "sku": "B"}'] + clean[20:] + [
        b'{"x": {"k": 1}, "sku": "S"}', b"[1]", b'{"sku": "\\ud800"}']
    out = parse_json_lines(lines)
    assert [reason for _, reason in out] == [parse_json_line(line)[1] for line in lines]
    assert [reason for _, reason in out if reason] == [
        "duplicate key sku", "record is not a JSON object", "invalid unicode in sku"]
    assert [r["event_id"] for r, _ in out[:20]] == [f"e{i}" for i in range(20)]
    assert out[-3] == ({"x": {"k": 1}, "sku": "S"}, None)


@pytest.mark.parametrize("table, field", [(t, f) for t, f in _STRING_CASES
                                          if f not in ("title", "brand")])
@pytest.mark.parametrize("char", ["\u200b", "\u200c", "\u202e", "\u2066", "\ufeff", "\u00ad"])
def test_invisible_format_characters_are_refused_outside_display_text(table, field, char):
    make_row, _ = _STRING_FIELDS[table]
    value = f"AA{char}001R" if field != "email" else f"a{char}b@x.com"
    assert _single_reason(table, make_row(**{field: value})) == f"invisible character in {field}"


def test_display_text_may_hold_a_soft_hyphen_or_an_emoji_joiner():
    checked = _check("catalog", [_catalog(title="Turbo\u00adcharger \U0001F468\u200d\U0001F527",
                                          brand="Acme\u00ad")])
    assert len(checked.bad_positions) == 0
