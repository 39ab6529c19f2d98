"""SPEC §2 data contracts: parse raw records and split them into valid rows and dead letters.

Validation is vectorised over a pandas batch so that the same checks serve JSON
Lines (parsed here), Parquet and BigQuery (typed by the source) and Pub/Sub
messages (the streaming parser calls :func:`validate` too) at millions of rows.
A bad row is never dropped: its position comes back with a reason so the caller
can write the original record to the dead-letter table.

What a valid record is, beyond types and required fields:

* identifiers (SKUs, ids) are already canonical: no surrounding whitespace, no
  control characters. A padded ``" AA001R "`` is refused, never stripped into
  another product's SKU;
* every contract string is valid Unicode (no lone surrogates) and free of
  control characters (C0, DEL, C1: NUL and ANSI escapes included) and, except
  display text, of invisible format characters (zero-width, bidi overrides);
* times are RFC 3339 with an explicit offset (``Z`` or ``+hh:mm``);
* an e-mail is an addr-spec (see :data:`EMAIL_PATTERN`);
* vehicle years, quantities and prices lie within :class:`models.config.InputConfig`;
* vehicle makes and models are canonicalised (see :func:`vehicle_spelling`).

Dead-letter reasons (each a counter ``dead_letter.<reason>``, so a field is named
only when it is a contract field, else "extra field"): parsing gives
``oversized record``, ``not UTF-8 text``, ``malformed JSON``, ``record is not a JSON
object``, ``duplicate key <field>``, ``invalid unicode in <field>``; validation gives
``missing <field>``, ``wrong type for <field>``, ``invalid unicode in <field>``,
``control character in <field>``, ``invisible character in <field>``, ``padded
<field>``, ``malformed <time field>``, ``implausible <time field>``, ``non-finite
<field>``, ``negative <field>``, ``non-integer <field>``, ``absurd price``, ``absurd
quantity``, ``implausible year``, ``zero quantity on order``, ``malformed email``,
``unknown event_name``, ``order event without order_id``, ``unknown kind``, ``zero
price``, ``malformed treatment_id``, ``unknown treatment_id`` (not in the configured
registry, :class:`models.config.InputConfig`), ``zero propensity`` / ``absurd propensity``
(a SENT's propensity must lie in (0, 1]).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import orjson
import pandas as pd

from models.config import InputConfig

VIEW = "Viewed Product"
CART = "Cart Update"
ORDER_EVENT_NAMES = ("Placed Order", "Ordered Product", "Consumer Website Order")
EVENT_NAMES = (VIEW, CART) + ORDER_EVENT_NAMES
TREATMENT_KINDS = ("SENT", "DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED")

DEFAULT_LIMITS = InputConfig()
# The default caps (configurable in ``inputs``); beyond them a value is a typo or an attack.
MAX_PRICE = DEFAULT_LIMITS.max_price
MAX_QUANTITY = DEFAULT_LIMITS.max_quantity
# A contract record is a few hundred bytes; a megabyte is an attack or a broken export.
MAX_RECORD_BYTES = 1_000_000
# Event times outside this range are clock errors, not history.
EARLIEST_TIME = pd.Timestamp("1990-01-01", tz="UTC")
LATEST_TIME = pd.Timestamp("2100-01-01", tz="UTC")
# RFC 5321: a forward path (and so an address) holds at most 254 characters.
MAX_EMAIL_LENGTH = 254

# RFC 3339 date-time (section 5.6) with an explicit offset: "Z" or "+hh:mm". Local times,
# "now", "2026", "2026/02/20 10:00" and "03/02/2026" are refused: their meaning is a guess.
# \Z, not $: "$" would accept a trailing newline.
RFC3339_PATTERN = r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
_RFC3339 = re.compile(RFC3339_PATTERN + r"\Z")
_RFC3339_VALUE = re.compile(RFC3339_PATTERN)

# An addr-spec (RFC 5322 3.4.1) restricted to what mail systems deliver: a dot-atom
# local part (no quoted strings, so no quotes, spaces, commas or angle brackets), one
# "@", and a domain of at least two labels of ASCII letters, digits and inner hyphens
# (internationalised domains arrive in their "xn--" form). Any case: lowercased later.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_PATTERN = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})+"
_EMAIL = re.compile(EMAIL_PATTERN, re.ASCII)

# C0 controls, DEL and C1 controls (NUL and the ESC of ANSI sequences included).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# UTF-16 surrogate code points: a JSON "\ud800" decodes to one and no UTF-8 writer takes it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Unicode format characters (category Cf, Unicode 14): zero-width spaces and joiners,
# bidirectional overrides, the BOM. Invisible, they make "AA\u200b001R" look like AA001R and
# "\u202eGNATSUM" display as MUSTANG; refused everywhere but display text (title, brand),
# where a soft hyphen or an emoji's zero-width joiner is legitimate.
_FORMAT = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f"
    "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f]")
DISPLAY_TEXT_FIELDS = frozenset({"title", "brand", "reason"})
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]|" + _FORMAT.pattern)
_SPACE = re.compile(r"\s")
_BOM = b"\xef\xbb\xbf"


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


def is_email(text: object) -> bool:
    """An addr-spec of at most 254 characters (see :data:`EMAIL_PATTERN`).

    >>> [is_email(e) for e in ("Ana.Lopez@Example.COM", "o'neil+cars@mail.example.org")]
    [True, True]
    >>> [is_email(e) for e in ("a@b@c.com", '"bob" <bob@x.com>', "x@localhost", " a@x.com")]
    [False, False, False, False]
    """
    return (isinstance(text, str) and len(text) <= MAX_EMAIL_LENGTH
            and _EMAIL.fullmatch(text) is not None)


def vehicle_spelling(text: str) -> str:
    """The canonical spelling of a make or model: its matching key and its display.

    Users type ``ford``, fitment files say ``Ford``; matched as written, the user's
    vehicle has no fitting parts and falls silently to global popularity. The key
    is Unicode case folding (so ``STRASSE`` and ``Straße`` meet) with whitespace runs
    collapsed to one space and the ends trimmed; the spelling kept is that key in
    upper case. An upper-case spelling is a function of the key alone, so every
    table, batch and streaming, and every run shows one spelling per vehicle, it
    keeps acronyms (``BMW``, ``CR-V``, ``F-150``) intact, and it is how vehicle
    registries write makes. Applied in :func:`validate` to ``make`` and ``model`` of
    users and fitment, so segment keys, vehicle shards and fitment joins all see it.

    >>> vehicle_spelling("  ford "), vehicle_spelling("Mustang  GT"), vehicle_spelling("cr-v")
    ('FORD', 'MUSTANG GT', 'CR-V')
    """
    return " ".join(text.split()).casefold().upper()


@dataclass(frozen=True)
class Column:
    """One contract field: its name, kind, whether a row may omit it and, for strings, its form.

    Forms of ``str`` columns: ``id`` (canonical identifier, refused when padded),
    ``text`` (free text, surrounding whitespace trimmed), ``email`` (an addr-spec)
    and ``vehicle`` (canonicalised by :func:`vehicle_spelling`).
    """

    name: str
    kind: str  # str | float | int | bool | time | tags
    required: bool = True
    form: str = "text"


def _id(name: str, required: bool = True) -> Column:
    return Column(name, "str", required, "id")


SCHEMAS: Dict[str, Tuple[Column, ...]] = {
    "catalog": (
        _id("sku"), Column("title", "str", False), Column("part_type", "str"),
        Column("brand", "str", False), Column("price", "float"),
        Column("image_url", "str", False), Column("tags", "tags", False),
        Column("is_universal", "bool", False), _id("variant_group", False),
    ),
    "fitment": (
        _id("sku"), Column("make", "str", form="vehicle"),
        Column("model", "str", form="vehicle"), Column("year", "int"),
    ),
    "users": (
        _id("user_id"), Column("email", "str", form="email"),
        Column("make", "str", False, "vehicle"), Column("model", "str", False, "vehicle"),
        Column("year", "int", False), Column("updated_at", "time", False),
    ),
    "events": (
        _id("event_id"), Column("event_time", "time"), _id("user_id"),
        Column("event_name", "str"), _id("sku"), Column("quantity", "int", False),
        Column("price", "float", False), _id("order_id", False),
    ),
    "treatment_events": (
        _id("event_id"), Column("event_time", "time"), _id("user_id"),
        _id("treatment_id"), _id("campaign_id"), Column("kind", "str"),
        Column("reason", "str", False),
        # At SENT (issue #18): the probability the sender chose this treatment, 0 < p <= 1,
        # and the allocation table's version it drew from; off-policy evaluation needs both.
        Column("propensity", "float", False), _id("allocation_version", False),
    ),
}
SCHEMAS["holdout_events"] = SCHEMAS["events"]
# Field names any contract knows; dead-letter reasons name only these (a reason is a
# counter name, so a record's own key names must not reach it).
CONTRACT_FIELDS = frozenset(c.name for columns in SCHEMAS.values() for c in columns)
VEHICLE_YEAR_TABLES = ("users", "fitment")


class Validated(NamedTuple):
    """A batch split in two: typed valid rows, and positions of bad rows with reasons."""

    rows: pd.DataFrame
    bad_positions: np.ndarray
    bad_reasons: np.ndarray


def _field(key: object) -> str:
    """A key as it may appear in a reason: a contract field's name, else "extra field"."""
    return key if key in CONTRACT_FIELDS else "extra field"


_JSON_WHITESPACE = b" \t\r\n"


def _may_repeat_a_key(raw: bytes, n_keys: int) -> bool:
    """False when ``raw`` provably holds no key twice (the usual case: two C-level passes).

    In text without backslashes no string can hold a quote, so once JSON whitespace
    is deleted every key ends in exactly one ``":`` (deleting never removes one, and
    at worst makes a value look like an extra key, which only costs the slow check).
    When that count equals the keys parsed, no key is repeated. Text with a
    backslash (an escaped key could hide a repeat), a nested object or a repeat is
    checked the slow way. ``raw`` may be many lines joined and ``n_keys`` their keys
    in total: each line has at least as many ``":`` as keys, so equal totals clear
    every line at once.
    """
    return b"\\" in raw or raw.translate(None, _JSON_WHITESPACE).count(b'":') != n_keys


class _Repeats:
    """``object_pairs_hook`` that builds dicts and remembers the first repeated key."""

    def __init__(self):
        self.key: Optional[str] = None

    def __call__(self, pairs: List[Tuple[str, object]]) -> dict:
        record = dict(pairs)
        if len(record) != len(pairs) and self.key is None:
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    self.key = key
                    break
                seen.add(key)
        return record


def _strings(value: object) -> Iterator[str]:
    """Every string in a parsed JSON value, keys included, depth-first."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _invalid_unicode(record: dict) -> Optional[str]:
    """The field holding a lone surrogate (in its name or anywhere in its value), if any."""
    for key, value in record.items():
        if _SURROGATE.search(key):
            return "extra field"  # no contract field's name holds one
        if any(_SURROGATE.search(s) for s in _strings(value)):
            return _field(key)
    return None


def parse_json_line(line: str | bytes) -> Tuple[Optional[dict], Optional[str]]:
    """Parse one JSON Lines record; returns (record, None) or (None, reason).

    orjson is fast and strict (it refuses lone surrogates, NaN and invalid UTF-8);
    a line it refuses is parsed again by the standard library so that a ``NaN``
    price is reported as a bad price rather than as malformed JSON, and a lone
    surrogate (``"\\ud800"``, which no UTF-8 writer can store) as
    ``invalid unicode in <field>``. A key given twice is ``duplicate key <field>``:
    orjson would silently keep the last value, so a line is re-parsed with a hook
    unless a cheap count proves it repeats no key (:func:`_may_repeat_a_key`).
    Records over ``MAX_RECORD_BYTES`` are refused before parsing.
    """
    return parse_json_lines([line])[0]


def parse_json_lines(lines: Sequence[str | bytes]) -> List[Tuple[Optional[dict], Optional[str]]]:
    """:func:`parse_json_line` over a batch, with the repeated-key count done once for it all.

    A file's lines are written alike, so one count over the joined batch clears
    the usual batch; only a batch it cannot clear is counted line by line.
    """
    out: List = [None] * len(lines)
    raws: List[bytes] = []
    parsed: List[int] = []  # positions orjson parsed into objects; repeats not yet ruled out
    loads, refused = orjson.loads, orjson.JSONDecodeError
    for i, line in enumerate(lines):
        if len(line) > MAX_RECORD_BYTES:
            out[i] = (None, "oversized record")
            continue
        if line.__class__ is not bytes:
            try:
                line = line.encode("utf-8")
            except UnicodeEncodeError:
                out[i] = (None, "not UTF-8 text")
                continue
        try:
            record = loads(line)
        except refused:
            out[i] = _parse_slowly(line)
            continue
        if record.__class__ is dict:
            out[i] = record
            parsed.append(i)
            raws.append(line)
        else:
            out[i] = (None, "record is not a JSON object")
    if parsed and _may_repeat_a_key(b"\n".join(raws), sum(len(out[i]) for i in parsed)):
        for i, raw in zip(parsed, raws):
            if _may_repeat_a_key(raw, len(out[i])):
                out[i] = _parse_slowly(raw)
    for i in parsed:
        if out[i].__class__ is dict:
            out[i] = (out[i], None)
    return out


def _parse_slowly(line: bytes) -> Tuple[Optional[dict], Optional[str]]:
    """The standard library's parse, for what orjson refused or a possibly repeated key."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    repeats = _Repeats()
    try:
        record = json.loads(text, object_pairs_hook=repeats)
    except (ValueError, TypeError, RecursionError):
        return None, "malformed JSON"
    if repeats.key is not None:
        return None, f"duplicate key {_field(repeats.key)}"
    if not isinstance(record, dict):
        return None, "record is not a JSON object"
    field = _invalid_unicode(record)
    if field is not None:
        return None, f"invalid unicode in {field}"
    return record, None


def strip_bom(line: bytes) -> bytes:
    """A line without the UTF-8 byte-order mark that some exporters put where a file starts."""
    return line[3:] if line.startswith(_BOM) else line


def storable_text(text: str) -> str:
    """Text any UTF-8 writer accepts: lone surrogates become ``\\udxxx`` escapes.

    >>> storable_text("x\\ud800y")
    'x\\\\ud800y'
    """
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def records_frame(table: str, records: Sequence[dict]) -> pd.DataFrame:
    """Column-wise frame of parsed records, contract columns first (extras kept)."""
    names = [c.name for c in SCHEMAS[table]]
    names += sorted(set().union(*map(dict.keys, records)).difference(names))
    # Object columns keep None (absent) apart from NaN (a bad value).
    return pd.DataFrame({n: pd.Series([r.get(n) for r in records], dtype=object)
                         for n in names})


def _kinds(raw: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Masks of missing values and of strings in an object array.

    ``infer_dtype`` answers "all strings" in C for the usual batch; only a batch
    mixing types pays a Python-level pass.
    """
    missing = pd.isna(raw)
    if pd.api.types.infer_dtype(raw, skipna=True) in ("string", "empty"):
        return missing, ~missing
    return missing, np.fromiter((isinstance(v, str) for v in raw), dtype=bool,
                                count=len(raw))


_WHOLE_COLUMN: Dict[re.Pattern, re.Pattern] = {}


def _all_match(pattern: re.Pattern, strings: np.ndarray) -> np.ndarray:
    """Mask of ``strings`` that ``pattern`` matches in full.

    One C-level match over the newline-joined column proves the usual clean
    column (the newline count proves no value held one of its own); only
    otherwise is each value matched on its own.
    """
    whole = _WHOLE_COLUMN.get(pattern)
    if whole is None:
        whole = _WHOLE_COLUMN.setdefault(pattern, re.compile(
            rf"(?:(?:{pattern.pattern})\n)*(?:{pattern.pattern})", pattern.flags))
    if len(strings):
        joined = "\n".join(strings)
        if joined.count("\n") == len(strings) - 1 and whole.fullmatch(joined) is not None:
            return np.ones(len(strings), dtype=bool)
    return np.fromiter((pattern.fullmatch(v) is not None for v in strings), dtype=bool,
                       count=len(strings))


def _flag(strings: np.ndarray, pattern: re.Pattern, sep: str = " ") -> np.ndarray:
    """Mask of the values of ``strings`` that ``pattern`` finds something in.

    One search over the column joined by ``sep`` (which the pattern must not find
    by itself) first: a clean column (the usual case) costs one C-level pass, and
    only a column with a hit is searched value by value.
    """
    if len(strings) and pattern.search(sep.join(strings)) is not None:
        return np.fromiter((pattern.search(v) is not None for v in strings), dtype=bool,
                           count=len(strings))
    return np.zeros(len(strings), dtype=bool)


def _spread(mask: np.ndarray, where: np.ndarray) -> np.ndarray:
    """A mask over the selected positions ``where`` spread back over the whole column."""
    full = np.zeros(len(where), dtype=bool)
    full[where] = mask
    return full


def _as_text(values: pd.Series, column: Column, reasons: "_Reasons") -> Tuple[pd.Series,
                                                                            np.ndarray]:
    """Typed strings of one column, with contract-string checks; mask of non-strings.

    Every form refuses lone surrogates and control characters. Identifiers are
    kept exactly as given and refused when padded; other text is trimmed;
    vehicle names are canonicalised. Blank values count as missing.
    """
    raw = values.to_numpy(object)
    missing, is_str = _kinds(raw)
    wrong = ~is_str & ~missing
    text = np.where(is_str, raw, None).astype(object)
    strings = raw[is_str].astype(object)
    # isprintable() is False for every control, format and surrogate character (and for a
    # few harmless ones, such as a no-break space): one fast C pass clears the usual column.
    if not " ".join(strings).isprintable() and _flag(strings, _UNSAFE).any():
        surrogate = _spread(_flag(strings, _SURROGATE), is_str)
        control = _spread(_flag(strings, _CONTROL), is_str)
        invisible = (np.zeros(len(raw), bool) if column.name in DISPLAY_TEXT_FIELDS
                     else _spread(_flag(strings, _FORMAT), is_str))
        reasons.add(surrogate, f"invalid unicode in {column.name}")
        reasons.add(control, f"control character in {column.name}")
        reasons.add(invisible, f"invisible character in {column.name}")
        # Such values go no further: a later step must not choke on them.
        bad = surrogate | control | invisible
        text[bad] = None
        is_str &= ~bad
        strings = text[is_str].astype(object)
    if column.form == "id":
        padded = np.zeros(len(raw), bool)
        if _flag(strings, _SPACE, "").any():  # identifiers rarely hold any space at all
            padded[is_str] = [v != v.strip() for v in strings]
        if padded.any():
            blank = np.zeros(len(raw), bool)
            blank[padded] = [not v.strip() for v in text[padded]]
            reasons.add(padded & ~blank, f"padded {column.name}")
            text[padded] = None
        text[is_str & (text == "")] = None
    elif column.form == "vehicle":
        if len(strings):
            spelling = {v: vehicle_spelling(v) or None for v in pd.unique(strings)}
            text[is_str] = [spelling[v] for v in strings]
    elif column.form == "email":
        text[is_str & (text == "")] = None
    elif len(strings):
        text[is_str] = [v.strip() or None for v in strings]
    return pd.Series(text, index=values.index, dtype=object), wrong


def _as_number(values: pd.Series) -> Tuple[pd.Series, np.ndarray, np.ndarray]:
    """Float values; masks of wrong types (text, bools) and of non-finite numbers."""
    obj = values.astype(object)
    raw = obj.to_numpy(object)
    # NaN is a value here (a NaN price is an error); only None is missing.
    present = np.fromiter((v is not None for v in raw), dtype=bool, count=len(raw))
    if pd.api.types.infer_dtype(raw, skipna=True) in ("integer", "floating",
                                                       "mixed-integer-float", "empty"):
        numeric = present  # all numbers (or NaN), no bools: the usual batch, decided in C
    else:
        # bool is an int in Python, but True is not a price.
        numeric = obj.map(lambda v: isinstance(v, (int, float, np.integer, np.floating))
                          and not isinstance(v, (bool, np.bool_))).to_numpy(bool)
    number = pd.to_numeric(obj.where(numeric, None), errors="coerce").astype(float)
    finite = np.isfinite(number.to_numpy())
    nonfinite = numeric & ~finite & present
    return number, present & ~numeric, nonfinite


def _as_time(values: pd.Series) -> Tuple[pd.Series, np.ndarray, np.ndarray]:
    """UTC timestamps from RFC 3339 strings (or a typed column); masks of wrong types and
    of strings that are not RFC 3339 date-times with an offset.

    The rule is :func:`parse_rfc3339`'s, vectorised: one regex match per value, then
    one ``to_datetime`` over the matching strings. A typed column (Parquet or BigQuery
    TIMESTAMP) is already unambiguous and taken as UTC.
    """
    present = values.notna().to_numpy(bool)
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = pd.to_datetime(values, utc=True)
        return (stamps.astype("datetime64[us, UTC]"), np.zeros(len(values), bool),
                present & stamps.isna().to_numpy(bool))
    obj = values.astype(object)
    raw = obj.to_numpy(object)
    _, is_str = _kinds(raw)
    rfc = _spread(_all_match(_RFC3339_VALUE, raw[is_str]), is_str)
    chosen = obj.where(rfc, None)
    if rfc.any() and any(c in "".join(raw[rfc]) for c in "tz"):
        chosen = chosen.map(lambda v: v.upper() if isinstance(v, str) else v)  # RFC 3339 allows
    stamps = pd.to_datetime(chosen, utc=True, errors="coerce", format="ISO8601")
    unparsed = rfc & stamps.isna().to_numpy(bool)  # e.g. month 13
    malformed = (is_str & ~rfc) | unparsed
    wrong = present & ~is_str
    return stamps.astype("datetime64[us, UTC]"), wrong, malformed


def _as_tags(values: pd.Series) -> Tuple[pd.Series, np.ndarray]:
    """Tags as tuples of lower-case strings; mask of values that are not lists of clean strings."""
    def convert(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ()
        if isinstance(v, (list, tuple, np.ndarray)) and all(
                isinstance(t, str) and not _UNSAFE.search(t) for t in v):
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


def _number_limits(table: str, column: Column, limits: InputConfig) -> Tuple[float, float]:
    """The plausible range of a numeric column (beyond it: "absurd"/"implausible")."""
    if column.name == "year":
        return limits.min_vehicle_year, limits.max_vehicle_year
    if column.name == "quantity":
        return 0, limits.max_quantity
    if column.name == "propensity":
        return 0, 1
    return 0, limits.max_price


def validate(table: str, frame: pd.DataFrame, limits: InputConfig = DEFAULT_LIMITS) -> Validated:
    """Type every contract column of ``table`` and find the rows that break the contract.

    Checks: required fields present, right types, valid Unicode and no control
    characters in any string, canonical (unpadded) identifiers, finite non-negative
    prices and quantities within ``limits``, vehicle years within ``limits``, known
    event names and kinds, order events carry an ``order_id`` and a positive
    quantity, RFC 3339 times with an offset, e-mails that are addr-specs. Makes
    and models are canonicalised (:func:`vehicle_spelling`). Extra fields pass
    through untouched. Batch readers pass the run's ``inputs`` configuration as
    ``limits``; the default is the configuration's default.
    """
    frame = frame.reset_index(drop=True)
    out = frame.copy()
    reasons = _Reasons(len(frame))
    for column in SCHEMAS[table]:
        values = frame[column.name] if column.name in frame.columns else pd.Series(
            [None] * len(frame), dtype=object)
        if column.kind == "str":
            typed, wrong = _as_text(values, column, reasons)
        elif column.kind in ("float", "int"):
            typed, wrong, nonfinite = _as_number(values)
            if column.name == "propensity" and pd.api.types.is_float_dtype(values.dtype):
                # Only SENT rows carry one: a typed source's (Parquet's) null on the other
                # rows reads as NaN and means absent. JSON sources arrive as objects.
                nonfinite &= ~np.isnan(typed.to_numpy())
            reasons.add(nonfinite, f"non-finite {column.name}")
            number = typed.to_numpy()
            low, high = _number_limits(table, column, limits)
            if column.name == "year":
                reasons.add(((number < low) | (number > high)), f"implausible {column.name}")
            else:
                reasons.add(number < 0, f"negative {column.name}")
                reasons.add(number > high, f"absurd {column.name}")
            if column.kind == "int":
                reasons.add(np.isfinite(number) & (number != np.round(number)),
                            f"non-integer {column.name}")
                # Out-of-range values are already refused; keep them from overflowing int64.
                typed = typed.where(typed.abs() <= max(abs(low), abs(high))).round().astype(
                    "Int64")
        elif column.kind == "time":
            typed, wrong, malformed = _as_time(values)
            reasons.add(malformed, f"malformed {column.name}")
            reasons.add(typed.notna().to_numpy(bool)
                        & ((typed < EARLIEST_TIME) | (typed >= LATEST_TIME)).to_numpy(bool),
                        f"implausible {column.name}")
        elif column.kind == "tags":
            typed, wrong = _as_tags(values)
        else:
            typed, wrong = _as_bool(values)
        reasons.add(wrong, f"wrong type for {column.name}")
        if column.required:
            missing = np.fromiter((v is None for v in values.to_numpy(object)), dtype=bool,
                                  count=len(values)) | (
                typed.isna().to_numpy(bool) & ~wrong)
            reasons.add(missing, f"missing {column.name}")
        out[column.name] = typed
    _check_table_rules(table, out, reasons, limits)
    bad = reasons.bad
    positions = np.flatnonzero(bad)
    return Validated(out.loc[~bad].reset_index(drop=True), positions, reasons.reasons[positions])


def unknown_treatment_reasons(ids: pd.Series, limits: InputConfig = DEFAULT_LIMITS
                              ) -> np.ndarray:
    """Why each treatment id may not become a bandit arm (None where it may).

    ``malformed treatment_id`` when it does not fully match
    ``limits.treatment_id_pattern``; ``unknown treatment_id`` when a registry
    (``limits.treatment_ids``) is configured and lacks it. Missing ids (None)
    get None here: the required-field check names them.

    >>> limits = InputConfig(treatment_ids=("T01",))
    >>> unknown_treatment_reasons(pd.Series(["T01", "T02", "<script>", None]), limits).tolist()
    [None, 'unknown treatment_id', 'malformed treatment_id', None]
    """
    pattern = re.compile(limits.treatment_id_pattern)
    values = ids.to_numpy(object)
    present = np.fromiter((isinstance(v, str) for v in values), bool, len(values))
    well_formed = np.fromiter((isinstance(v, str) and pattern.fullmatch(v) is not None
                               for v in values), bool, len(values))
    out = np.full(len(values), None, dtype=object)
    out[present & ~well_formed] = "malformed treatment_id"
    if limits.treatment_ids:
        known = ids.isin(limits.treatment_ids).to_numpy(bool)
        out[present & well_formed & ~known] = "unknown treatment_id"
    return out


def _check_table_rules(table: str, frame: pd.DataFrame, reasons: _Reasons,
                       limits: InputConfig = DEFAULT_LIMITS) -> None:
    """Cross-field rules of one table, after the columns are typed."""
    if table in ("events", "holdout_events"):
        names = frame["event_name"]
        reasons.add(~names.isin(EVENT_NAMES).to_numpy(bool), "unknown event_name")
        is_order = names.isin(ORDER_EVENT_NAMES).to_numpy(bool)
        reasons.add(is_order & frame["order_id"].isna().to_numpy(bool),
                    "order event without order_id")
        # An order line of no units is no purchase (negative ones are refused above).
        reasons.add(is_order & (frame["quantity"] == 0).fillna(False).to_numpy(bool),
                    "zero quantity on order")
    elif table == "treatment_events":
        reasons.add(~frame["kind"].isin(TREATMENT_KINDS).to_numpy(bool), "unknown kind")
        treatment = unknown_treatment_reasons(frame["treatment_id"], limits)
        for reason in ("malformed treatment_id", "unknown treatment_id"):
            reasons.add(treatment == reason, reason)
        reasons.add((frame["propensity"] == 0).fillna(False).to_numpy(bool), "zero propensity")
    elif table == "users":
        email = frame["email"].astype(object)
        reasons.add(email.notna().to_numpy(bool) & ~email.map(is_email).to_numpy(bool),
                    "malformed email")
        frame["email_lower"] = email.map(lambda e: e.lower() if isinstance(e, str) else None)
    elif table == "catalog":
        reasons.add(frame["price"].to_numpy() == 0, "zero price")


def unknown_sku_mask(skus: pd.Series, known) -> np.ndarray:
    """Rows whose SKU is not among the catalogue's SKUs (a hash lookup per row)."""
    return ~skus.isin(known).to_numpy(bool)


def to_record_json(frame: pd.DataFrame, positions: np.ndarray) -> List[str]:
    """Selected rows as JSON text, for dead letters of a typed (Parquet) source.

    ASCII-only JSON: a lone surrogate or control character in a refused value is
    stored as an escape, so the dead-letter write cannot fail on the very record
    it explains.
    """
    if len(positions) == 0:
        return []
    rows = frame.iloc[positions]
    return [json.dumps(r, default=str, allow_nan=True, ensure_ascii=True)
            for r in rows.to_dict("records")]
