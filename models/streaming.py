"""Pure logic of the streaming refresh: messages in, per-window popularity, refreshed users out.

The streaming job applies the batch job's own functions (SPEC §3) to what a
window of the stream adds, so both agree on the same events:

- a Pub/Sub message is parsed and validated with `models.contracts`, exactly
  like a JSON Lines record of the same table (`parse_messages`);
- a window's popularity is the batch job's `popularity.partial_popularity`
  at ``as_of`` = the window's end over the history's order lines plus the
  window's; the job keeps it as additive decayed cells per (level, segment,
  sku) (`models.stream_popularity`), and `window_popularity` here computes the
  same figure from the lines (the reference the tests compare with);
- a refreshed user is scored by `recommend.recommend_all` with signals from
  `profiles.attach_signals` (`refresh_users`).

Slowly changing inputs (catalogue, fitment, users, the order history) are one
immutable `ReferenceData` built by `build_reference`; the Beam layer decides
when to rebuild it. Nothing here imports Beam.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import (Dict, FrozenSet, Iterable, List, Mapping, NamedTuple, Optional,
                    Sequence, Set, Tuple)

import numpy as np
import pandas as pd

from models import campaign, contracts, popularity, profiles, recommend
from models.catalog import CatalogArrays, resolve_conflicts
from models.config import InputConfig, RecsConfig
from models.contracts import ORDER_EVENT_NAMES

EVENT_TIME_ATTRIBUTE = "event_time"
EPOCH = pd.Timestamp(0, tz="UTC")
TIME = "datetime64[us, UTC]"
_MICRO = pd.Timedelta(microseconds=1)
_PUBSUB_PATH = re.compile(r"^projects/[a-z][-a-z0-9]{4,28}[a-z0-9]/(?P<kind>subscriptions|topics)/"
                          r"[A-Za-z][-A-Za-z0-9._~%+]{2,254}$")


def is_pubsub_path(value: str, kind: str) -> bool:
    """Whether ``value`` is ``projects/<p>/<kind>/<name>``, kind ``subscriptions`` or ``topics``.

    >>> is_pubsub_path("projects/demo-project/subscriptions/events-sub", "subscriptions")
    True
    >>> is_pubsub_path("projects/demo-project/topics/x; rm -rf /", "topics")
    False
    """
    match = _PUBSUB_PATH.match(value) if isinstance(value, str) else None
    return bool(match) and match["kind"] == kind

# Fields a parsed message keeps, per table; ``event_time`` travels as integer
# microseconds since the epoch (``event_time_us``) so records stay primitive.
RECORD_FIELDS: Dict[str, Tuple[str, ...]] = {
    "events": ("event_id", "user_id", "event_name", "sku", "order_id", "quantity", "price"),
    "treatment_events": ("event_id", "user_id", "treatment_id", "campaign_id", "kind",
                         "reason", "propensity", "allocation_version"),
}

# Why a message's event-time attribute was not usable (the payload field decides anyway).
ATTRIBUTE_OK = "ok"
ATTRIBUTE_MISSING = "missing"
ATTRIBUTE_UNPARSEABLE = "unparseable"
ATTRIBUTE_MISMATCH = "mismatch"

# Reasons a user is refreshed.
REASON_ORDER = "order"
REASON_INTENT = "intent"
REASON_SEGMENT = "segment_ranking_changed"


# --- windows ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowSpec:
    """Sliding event-time windows and how late an element may be and still count.

    Attributes:
      size: length of each window (popularity and bandit counts cover this span).
      period: a window starts (and one closes) every period; refreshes run this often.
      lateness: how long after a window's end its elements are still accepted;
        later ones are dropped by the aggregation and counted by the audit.

    >>> WindowSpec(pd.Timedelta(days=7), pd.Timedelta(hours=1), pd.Timedelta(hours=6)).overlap
    168
    >>> WindowSpec(pd.Timedelta(hours=1), pd.Timedelta(hours=2), pd.Timedelta(0))
    Traceback (most recent call last):
    ...
    ValueError: invalid windows: need 0 < period (0 days 02:00:00) <= size (0 days 01:00:00)
    """

    size: pd.Timedelta
    period: pd.Timedelta
    lateness: pd.Timedelta

    def __post_init__(self) -> None:
        one = pd.Timedelta(seconds=1)
        for name in ("size", "period", "lateness"):
            value = getattr(self, name)
            if not isinstance(value, pd.Timedelta) or value % one:
                raise ValueError(f"invalid windows: {name} must be whole seconds, got {value!r}")
        if not pd.Timedelta(0) < self.period <= self.size:
            raise ValueError(f"invalid windows: need 0 < period ({self.period}) <= size "
                             f"({self.size})")
        if self.size % self.period:
            raise ValueError(f"invalid windows: size ({self.size}) must be a multiple of "
                             f"period ({self.period}) so every window ends on a refresh")
        if self.lateness < pd.Timedelta(0):
            raise ValueError(f"invalid windows: lateness must be >= 0, got {self.lateness}")

    @classmethod
    def of_seconds(cls, size: int, period: int, lateness: int) -> "WindowSpec":
        return cls(pd.Timedelta(seconds=size), pd.Timedelta(seconds=period),
                   pd.Timedelta(seconds=lateness))

    @property
    def overlap(self) -> int:
        """How many windows each element belongs to."""
        return int(self.size // self.period)

    def windows_of(self, at_us: int) -> List[Tuple[int, int]]:
        """[start, end) in microseconds of every window holding an instant (Beam's assignment).

        >>> spec = WindowSpec.of_seconds(10, 5, 0)
        >>> spec.windows_of(7_000_000)
        [(5000000, 15000000), (0, 10000000)]
        """
        size, period = self.size // _MICRO, self.period // _MICRO
        start = at_us - (at_us % period)
        out = []
        while start > at_us - size:
            out.append((start, start + size))
            start -= period
        return out


# --- storable text -------------------------------------------------------------------------

# A refused payload is stored whole up to this many UTF-8 bytes, beyond it as its first
# this-many bytes plus `TRUNCATION_NOTE`: a BigQuery row is limited to 10 MB and a Pub/Sub
# message may be as large, so a dead letter must be bounded to be storable at all (and the
# head of a payload is what tells a person what it was).
DEAD_LETTER_RECORD_BYTES = 64 * 1024
TRUNCATION_NOTE = " [truncated: first {kept} of {size} bytes]"
# Why a record whose text cannot be UTF-8 (a lone surrogate such as ``"\\ud800"``) is refused:
# Beam's coders, BigQuery and Pub/Sub all encode text as UTF-8, so such a value would raise
# at every step after the parse. The words are `contracts.parse_json_line`'s, per field.
UNENCODABLE_REASON = "invalid unicode in {field}"


def storable(text: str) -> str:
    """``text`` with every code point UTF-8 cannot encode (lone surrogates) written as an escape.

    `contracts.storable_text` (the batch job's), with a fast path for ASCII,
    which is almost every value; the same object comes back when nothing changed.

    >>> storable("ok"), storable("a" + chr(0xD800) + "b")
    ('ok', 'a\\\\ud800b')
    """
    return text if text.isascii() else contracts.storable_text(text)


def is_encodable(value) -> bool:
    """Whether every string in a parsed JSON value (keys included) can be UTF-8 encoded.

    >>> is_encodable({"a": ["x", {"b": 1}]}), is_encodable({"a": ["x" + chr(0xDFFF)]})
    (True, False)
    """
    pending = [value]   # a stack, not recursion: a hostile record may nest a thousand deep
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and storable(item) is not item:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return True


def unencodable_field(record: Mapping, fields: Sequence) -> Optional[str]:
    """The first of ``fields`` whose name or value holds text UTF-8 cannot encode, else None.

    >>> unencodable_field({"a": "x", "b": ["y" + chr(0xD800)]}, ["a", "b"])
    'b'
    """
    for field in fields:
        if not (is_encodable(field) and is_encodable(record.get(field))):
            return field
    return None


def dead_letter_text(payload, limit: int = DEAD_LETTER_RECORD_BYTES) -> str:
    """A refused payload (bytes or text) as storable text of at most ``limit`` bytes plus a note.

    Bytes that are not UTF-8 become U+FFFD; a payload over ``limit`` bytes keeps
    its first ``limit`` bytes and ends with `TRUNCATION_NOTE` giving its size.

    >>> dead_letter_text(b"abcdef", limit=4)
    'abcd [truncated: first 4 of 6 bytes]'
    >>> dead_letter_text(b"\\xff ok")
    '\\ufffd ok'
    """
    raw = payload if isinstance(payload, bytes) else storable(str(payload)).encode("utf-8")
    if len(raw) <= limit:
        return raw.decode("utf-8", errors="replace")
    return (raw[:limit].decode("utf-8", errors="replace")
            + TRUNCATION_NOTE.format(kept=limit, size=len(raw)))


# --- messages ---------------------------------------------------------------------------

def micros(stamps: pd.Series) -> np.ndarray:
    """UTC timestamps as integer microseconds since the epoch."""
    return ((stamps.astype(TIME) - EPOCH) // _MICRO).to_numpy(np.int64)


def from_micros(values: Sequence[int]) -> pd.Series:
    """Integer microseconds since the epoch as UTC timestamps."""
    return pd.Series(pd.to_datetime(np.asarray(values, dtype=np.int64), unit="us", utc=True)
                     ).astype(TIME)


def attribute_time(attributes: Optional[Mapping[str, str]]) -> Optional[pd.Timestamp]:
    """The ``event_time`` message attribute as a UTC time (RFC 3339 or epoch millis), else None.

    >>> attribute_time({"event_time": "2026-05-01T10:00:00Z"})
    Timestamp('2026-05-01 10:00:00+0000', tz='UTC')
    >>> attribute_time({"event_time": "1777629600000"}), attribute_time({}) is None
    (Timestamp('2026-05-01 10:00:00+0000', tz='UTC'), True)
    """
    raw = (attributes or {}).get(EVENT_TIME_ATTRIBUTE)
    if not isinstance(raw, str) or not raw.strip():
        return None
    raw = raw.strip()
    try:
        if raw.isdigit():  # what Beam's Pub/Sub sources also accept: epoch milliseconds
            stamp = pd.Timestamp(int(raw), unit="ms", tz="UTC")
        else:
            stamp = pd.Timestamp(raw)
        if stamp is pd.NaT:
            return None
        # Past year 2262 (e.g. "9999-12-31T23:59:59Z") comparing with the payload's time
        # would overflow and fail the whole bundle: such an attribute is unparseable.
        stamp = stamp.as_unit("ns")
    except (ValueError, OverflowError):
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


class ParsedMessages(NamedTuple):
    """A batch of messages split into valid records and refused messages.

    Attributes:
      records: one primitive dict per valid message (`RECORD_FIELDS` plus
        ``event_time_us``), in message order.
      bad: ``(position, reason)`` of every refused message.
      attribute_status: per valid record, how its ``event_time`` attribute
        compared with the payload (`ATTRIBUTE_OK`, ``_MISSING``, ...).
    """

    records: List[dict]
    bad: List[Tuple[int, str]]
    attribute_status: List[str]


def parse_messages(table: str, payloads: Sequence[bytes],
                   attributes: Sequence[Optional[Mapping[str, str]]],
                   limits: Optional[InputConfig] = None) -> ParsedMessages:
    """Parses and validates Pub/Sub messages of one SPEC §2 table.

    The payload's ``event_time`` is the event time: it is the contract field
    that `contracts.validate` checks and the one the batch job reads from the
    same events, so a message falls in the same window in both. The
    ``event_time`` attribute is only compared with it (missing, unparseable
    or different by more than a second are reported, not fatal), so a
    publisher that forgets the attribute cannot stall or crash the job.

    A record holding text UTF-8 cannot encode (a lone surrogate escape such as
    ``"\\ud800"``, which JSON allows) is refused here (`UNENCODABLE_REASON`,
    which `contracts.parse_json_line` already gives the batch job): every later
    step encodes its text, and one such value would fail its bundle again and
    again. ``limits`` are the config's
    plausibility bounds (`InputConfig`), the batch job's own.

    >>> good = b'{"event_id": "E1", "event_time": "2026-05-01T10:00:00Z", "user_id": "U1",' \\
    ...        b' "event_name": "Viewed Product", "sku": "S1"}'
    >>> out = parse_messages("events", [good, b"{oops", good], [{}, {}, {"event_time": "x"}])
    >>> [r["event_id"] for r in out.records], out.bad, out.attribute_status
    (['E1', 'E1'], [(1, 'malformed JSON')], ['missing', 'unparseable'])
    """
    parsed, positions, bad = [], [], []
    for i, payload in enumerate(payloads):
        # A byte-order mark some publishers put first is ignored, as at a file's start.
        payload = (contracts.strip_bom(payload) if isinstance(payload, bytes)
                   else str(payload).removeprefix("\ufeff"))
        record, reason = contracts.parse_json_line(payload)
        if record is None:
            bad.append((i, reason))
        elif not is_encodable(record):   # behind the contract's own check: never reached yet
            field = unencodable_field(record, sorted(record, key=str))
            bad.append((i, UNENCODABLE_REASON.format(
                field=field if is_encodable(field) else "extra field")))
        else:
            parsed.append(record)
            positions.append(i)
    if not parsed:
        return ParsedMessages([], bad, [])
    frame = contracts.records_frame(table, parsed)
    checked = (contracts.validate(table, frame) if limits is None
               else contracts.validate(table, frame, limits=limits))
    for p, reason in zip(checked.bad_positions, checked.bad_reasons):
        bad.append((positions[int(p)], str(reason)))
    keep = np.setdiff1d(np.arange(len(parsed)), checked.bad_positions)
    kept_positions = [positions[int(k)] for k in keep]
    records = typed_records(table, checked.rows)
    status = []
    for record, position in zip(records, kept_positions):
        stamp = attribute_time(attributes[position])
        raw = (attributes[position] or {}).get(EVENT_TIME_ATTRIBUTE)
        if raw is None:
            status.append(ATTRIBUTE_MISSING)
        elif stamp is None:
            status.append(ATTRIBUTE_UNPARSEABLE)
        elif abs(int((stamp - EPOCH) // _MICRO) - record["event_time_us"]) > 1_000_000:
            status.append(ATTRIBUTE_MISMATCH)
        else:
            status.append(ATTRIBUTE_OK)
    bad.sort()
    return ParsedMessages(records, bad, status)


def _plain(value):
    """A pandas/numpy scalar as a JSON-friendly Python value (missing → None)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def typed_records(table: str, rows: pd.DataFrame) -> List[dict]:
    """Validated rows as primitive dicts: `RECORD_FIELDS` plus ``event_time_us``."""
    fields = [f for f in RECORD_FIELDS[table] if f in rows.columns]
    stamps = micros(rows["event_time"]).tolist()
    columns = [rows[f].astype(object).tolist() for f in fields]
    out = []
    for i, at in enumerate(stamps):
        record = {f: _plain(col[i]) for f, col in zip(fields, columns)}
        record["event_time_us"] = int(at)
        out.append(record)
    return out


def events_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Event records (`typed_records` of ``events``) as the frame the batch functions read."""
    records = list(records)
    columns = ("event_id", "user_id", "event_name", "sku", "order_id")
    frame = pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object)
                          for c in columns})
    frame["event_time"] = from_micros([r["event_time_us"] for r in records])
    return frame


def is_order(record: Mapping) -> bool:
    """An order event (any of the three names that report one order)."""
    return record.get("event_name") in ORDER_EVENT_NAMES


# --- the treatment funnel of one recipient ---------------------------------------------------

# What the batch job's CheckSkus calls an event or fitment row whose SKU the catalogue lacks
# (transforms/recommend.py DropUnknownSkusFn); the streaming job refuses with the same words.
UNKNOWN_SKU_REASON = "unknown sku"
RECIPIENT_KEY = campaign.RECIPIENT_KEY


class FunnelMemory(NamedTuple):
    """What the stream remembers of one recipient (campaign, treatment, user).

    Attributes:
      sent_at_us: event time of its earliest SENT seen (None: no send seen yet).
      reached: the kinds already counted, so a stage reached twice counts once.
    """

    sent_at_us: Optional[int]
    reached: FrozenSet[str]


class FunnelVerdict(NamedTuple):
    memory: FunnelMemory
    refusal: Optional[str]     # dead-letter reason, the batch job's words
    repeat: bool               # a stage already reached: reconciled as a duplicate


def funnel_step(memory: Optional[FunnelMemory], kind: str, at_us: int) -> FunnelVerdict:
    """One treatment event against what its recipient's earlier events established.

    The batch job's `campaign.check_funnel`, one event at a time: an event other
    than SENT needs a SENT of the same recipient at or before its time, else it is
    refused as ``'<kind> without send'`` (``'before send'`` when the only send is
    later); of the consistent events only the first of each kind counts.

    >>> v = funnel_step(None, "CLICKED", 5)
    >>> v.refusal, v.memory
    ('click without send', FunnelMemory(sent_at_us=None, reached=frozenset()))
    >>> sent = funnel_step(None, "SENT", 10).memory
    >>> [funnel_step(sent, "VIEWED", t)[1:] for t in (9, 10)]
    [('view before send', False), (None, False)]
    >>> funnel_step(funnel_step(sent, "VIEWED", 11).memory, "VIEWED", 12)[1:]
    (None, True)
    """
    memory = memory or FunnelMemory(None, frozenset())
    if kind == campaign.SENT:
        first = memory.sent_at_us is None or at_us < memory.sent_at_us
        sent_at = at_us if first else memory.sent_at_us
        return FunnelVerdict(FunnelMemory(sent_at, memory.reached | {kind}), None,
                             kind in memory.reached)
    if memory.sent_at_us is None or at_us < memory.sent_at_us:
        return FunnelVerdict(memory, campaign.funnel_refusal(
            kind, before_send=memory.sent_at_us is not None), False)
    if kind in memory.reached:
        return FunnelVerdict(memory, None, True)
    return FunnelVerdict(FunnelMemory(memory.sent_at_us, memory.reached | {kind}), None, False)


# --- a window's order lines ------------------------------------------------------------------

OrderKey = Tuple[str, str]                        # (order_id, sku)
OrderLine = Tuple[int, str, str, str]             # (event_time_us, event_id, user_id, event_name)


def add_order(lines: Dict[OrderKey, OrderLine], record: Mapping) -> None:
    """Keeps the earliest event of each (order_id, sku): one order line, whatever names report it.

    Ties on time go to the smaller event id, so the kept line never depends on
    arrival order (the batch job's `order_lines` keeps the earliest too).
    """
    key = (record["order_id"], record["sku"])
    line = (int(record["event_time_us"]), record["event_id"], record["user_id"],
            record["event_name"])
    if key not in lines or line < lines[key]:
        lines[key] = line


def merge_orders_into(target: Dict[OrderKey, OrderLine],
                      part: Mapping[OrderKey, OrderLine]) -> Dict[OrderKey, OrderLine]:
    """Adds ``part`` to ``target`` in place, the earliest line per key winning; returns target."""
    for key, line in part.items():
        if key not in target or line < target[key]:
            target[key] = line
    return target


def merge_orders(parts: Iterable[Dict[OrderKey, OrderLine]]) -> Dict[OrderKey, OrderLine]:
    """Union of order-line maps, the earliest line per key winning (associative, commutative)."""
    merged: Dict[OrderKey, OrderLine] = {}
    for part in parts:
        merge_orders_into(merged, part)
    return merged


def orders_frame(lines: Mapping[OrderKey, OrderLine]) -> pd.DataFrame:
    """Order lines as order events (the columns `profiles.orders_with_segments` reads)."""
    return events_frame({"order_id": order_id, "sku": sku, "event_time_us": at,
                         "event_id": event_id, "user_id": user, "event_name": name}
                        for (order_id, sku), (at, event_id, user, name) in sorted(lines.items()))


# --- reference data ------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceData:
    """Slowly changing inputs, resolved once per version and shared by every refresh.

    Attributes:
      version: fingerprint of the sources it was built from.
      catalog: resolved catalogue, one row per SKU (`resolve_conflicts`).
      arrays: the same catalogue as arrays (eligibility included).
      fitting: vehicle key → SKUs that fit it.
      users: every valid user, ``is_duplicate`` flagged per lower-case e-mail
        (what the batch job joins order lines with).
      servable: users who may receive a row (one per e-mail and per user id),
        indexed by ``user_id``.
      history_lines: distinct order lines of the history with the buyer's segment.
      history_popularity: `partial_popularity` of ``history_lines`` at ``history_as_of``
        (the latest line's time), rescaled to each window's end by `rescale`.
      history_keys: the (order_id, sku) pairs of ``history_lines``.
      history_events: the history's events (deduplicated, known SKUs), sorted by user.
      history_index: user_id → positions of that user's rows in ``history_events``.
      vehicle_users: vehicle key (group attributes) → servable user ids.
      conflicts: catalogue rows that lost a conflict (reported, not used).
    """

    version: str
    catalog: pd.DataFrame
    arrays: CatalogArrays
    fitting: Mapping[str, frozenset]
    users: pd.DataFrame
    servable: pd.DataFrame
    history_lines: pd.DataFrame
    history_popularity: pd.DataFrame
    history_as_of: Optional[pd.Timestamp]
    history_keys: frozenset
    history_events: pd.DataFrame
    history_index: Mapping[str, np.ndarray]
    vehicle_users: Mapping[str, Tuple[str, ...]]
    conflicts: int

    def user_events(self, user_ids: Iterable[str]) -> pd.DataFrame:
        """The history's events of some users (an empty frame when they have none)."""
        positions = [self.history_index[u] for u in user_ids if u in self.history_index]
        if not positions:
            return self.history_events.iloc[:0]
        return self.history_events.iloc[np.concatenate(positions)]


def fitting_by_vehicle(fitment: pd.DataFrame, attributes: Sequence[str]) -> Dict[str, frozenset]:
    """Vehicle key (e.g. ``Ford|Mustang|2015``) → SKUs that fit it."""
    if not len(fitment) or not attributes:
        return {}
    fitment = fitment.drop_duplicates(["sku", *attributes])
    keys = popularity.segment_keys(fitment, list(attributes))
    return {k: frozenset(g) for k, g in fitment["sku"].groupby(keys.to_numpy(object))}


def empty_events() -> pd.DataFrame:
    """An events frame without rows (the columns the batch functions read)."""
    return events_frame([])


def build_reference(catalog: pd.DataFrame, fitment: Optional[pd.DataFrame], users: pd.DataFrame,
                    history: Optional[pd.DataFrame], config: RecsConfig,
                    version: str) -> ReferenceData:
    """Resolves validated inputs into `ReferenceData`, as the batch job prepares them.

    The catalogue's conflicts are resolved; users are flagged duplicate per
    e-mail (the batch job's MarkDuplicateEmails) and then per user id;
    history events are deduplicated by id and stripped of unknown SKUs (the
    batch job's CheckSkus) before their order lines get the buyer's segment.
    """
    resolved = resolve_conflicts(catalog)
    arrays = CatalogArrays.build(resolved.catalog, config.rules)
    fit_attrs = list(config.fitment_attributes)
    fitting = fitting_by_vehicle(fitment if fitment is not None else pd.DataFrame(), fit_attrs)
    flagged = profiles.mark_duplicate_users(users, "email_lower")
    servable = profiles.mark_duplicate_users(flagged, "user_id")
    servable = servable.loc[~servable["is_duplicate"].to_numpy(bool)].set_index(
        "user_id", drop=False)
    attrs = list(config.segment_attributes)
    if history is not None and len(history):
        known = ~contracts.unknown_sku_mask(history["sku"], resolved.catalog["sku"])
        events = profiles.dedupe_events(history.loc[known]).rows
        events = events.loc[:, ["event_id", "user_id", "event_name", "sku", "order_id",
                                "event_time"]].astype({"event_time": TIME})
        lines = profiles.orders_with_segments(events, flagged, attrs)
    else:
        events = empty_events()
        lines = profiles.orders_with_segments(events, flagged, attrs)
    events = events.sort_values(["user_id", "event_time"], kind="stable").reset_index(drop=True)
    index = {u: np.asarray(p) for u, p in events.groupby("user_id", sort=False).indices.items()}
    vehicles = popularity.segment_keys(servable, list(config.group_attributes))
    vehicle_users = {k: tuple(sorted(g)) for k, g in
                     servable["user_id"].groupby(vehicles.to_numpy(object)) if k is not None}
    history_as_of = lines["event_time"].max() if len(lines) else None
    history_pop = (popularity.partial_popularity(lines, history_as_of, config) if len(lines)
                   else popularity.merge_popularity([]))
    keys = frozenset(zip(lines["order_id"], lines["sku"]))
    return ReferenceData(version, resolved.catalog, arrays, fitting, flagged, servable, lines,
                         history_pop, history_as_of, keys, events, index, vehicle_users,
                         len(resolved.conflicts))


# --- popularity of one window ---------------------------------------------------------------

def rescale(pop: pd.DataFrame, from_as_of: pd.Timestamp, to_as_of: pd.Timestamp,
            half_life_days: float) -> pd.DataFrame:
    """Popularity decayed at ``from_as_of`` re-expressed at a later ``to_as_of``.

    Decay is exponential, so every weight shrinks by the same factor
    0.5 ** (days between / half-life): the history's popularity is computed
    once per reference version instead of once per window.

    >>> t = pd.Series(pd.to_datetime(["2026-01-01", "2026-01-20"], utc=True))
    >>> lines = pd.DataFrame({"sku": ["A", "B"], "event_time": t})
    >>> early, late = pd.Timestamp("2026-01-31", tz="UTC"), pd.Timestamp("2026-03-02", tz="UTC")
    >>> from models.popularity import decay_weights
    >>> base = pd.DataFrame({"weight": decay_weights(t, early, 30.0)})
    >>> bool(np.allclose(rescale(base, early, late, 30.0)["weight"], decay_weights(t, late, 30.0)))
    True
    """
    days = (to_as_of - from_as_of) / pd.Timedelta(days=1)
    return pop.assign(weight=pop["weight"] * np.power(0.5, days / half_life_days))


def window_popularity(window_orders: pd.DataFrame, reference: ReferenceData,
                      as_of: pd.Timestamp, config: RecsConfig) -> pd.DataFrame:
    """Decayed distinct-order counts per (level, segment, sku) at ``as_of`` (a window's end).

    Lines are the history's plus the window's orders of known SKUs, each
    order line once (the stream may repeat an order the history holds, whose
    line then counts as the history has it), with the buyer's segment from the
    current users; the counting is the batch job's `partial_popularity`, and
    the sum of two partials is `merge_popularity`. With no history this is
    the batch job over exactly the window's events with the same ``as_of``.
    """
    attrs = list(config.segment_attributes)
    known = ~contracts.unknown_sku_mask(window_orders["sku"], reference.catalog["sku"])
    lines = profiles.orders_with_segments(window_orders.loc[known], reference.users, attrs)
    if not len(reference.history_lines):
        return popularity.partial_popularity(lines, as_of, config)
    if as_of < reference.history_as_of:   # a window older than the history: score it whole
        lines = pd.concat([reference.history_lines, lines], ignore_index=True)
        lines = (lines.sort_values(["order_id", "sku", "event_time"], kind="stable")
                 .drop_duplicates(["order_id", "sku"], keep="first").reset_index(drop=True))
        return popularity.partial_popularity(lines, as_of, config)
    fresh = np.array([k not in reference.history_keys
                      for k in zip(lines["order_id"], lines["sku"])], dtype=bool)
    history = rescale(reference.history_popularity, reference.history_as_of, as_of,
                      config.scoring.half_life_days)
    stream = popularity.partial_popularity(lines.loc[fresh].reset_index(drop=True), as_of,
                                           config)
    return popularity.merge_popularity([history, stream])


class Scorer(NamedTuple):
    """What scoring one popularity snapshot needs, built once and reused."""

    index: popularity.PopularityIndex
    recommender: recommend.Recommender


def scorer(reference: ReferenceData, pop: pd.DataFrame, config: RecsConfig) -> Scorer:
    """A recommender over one popularity frame and the reference catalogue."""
    index = popularity.PopularityIndex(pop, reference.arrays.sku, config)
    return Scorer(index, recommend.Recommender(reference.arrays, index, config))


# --- refreshing users ----------------------------------------------------------------------

class RefreshRequest(NamedTuple):
    """Why a user is refreshed, and the user's recent stream events (event tuples)."""

    reasons: Tuple[str, ...]
    events: Tuple[Tuple, ...]   # (event_id, event_name, sku, order_id, event_time_us)


def merge_requests(requests: Iterable[Tuple[str, RefreshRequest]]) -> Dict[str, RefreshRequest]:
    """One request per user: reasons and events united (events by id).

    >>> a = RefreshRequest(("intent",), (("E1", "Viewed Product", "S", None, 1),))
    >>> b = RefreshRequest(("order",), (("E1", "Viewed Product", "S", None, 1),
    ...                                 ("E2", "Placed Order", "S", "O", 2)))
    >>> merged = merge_requests([("U", a), ("U", b)])["U"]
    >>> merged.reasons, [e[0] for e in merged.events]
    (('intent', 'order'), ['E1', 'E2'])
    """
    reasons: Dict[str, Set[str]] = {}
    events: Dict[str, Dict[str, Tuple]] = {}
    for user, request in requests:
        reasons.setdefault(user, set()).update(request.reasons)
        mine = events.setdefault(user, {})
        for event in request.events:
            mine.setdefault(event[0], event)
    return {u: RefreshRequest(tuple(sorted(reasons[u])),
                              tuple(sorted(events[u].values(), key=lambda e: (e[4], e[0]))))
            for u in reasons}


def requests_of_events(events: pd.DataFrame, reasons: Tuple[str, ...] = ("order",)
                       ) -> Dict[str, RefreshRequest]:
    """One request per user of ``events``, holding all of the user's events in time order
    (what `TouchedUsers` keeps for a user the stream touched)."""
    found: Dict[str, List[Tuple]] = {}
    for r in typed_records("events", events):
        found.setdefault(r["user_id"], []).append(
            (r["event_id"], r["event_name"], r["sku"], r["order_id"], r["event_time_us"]))
    return {u: RefreshRequest(tuple(reasons), tuple(sorted(e, key=lambda x: (x[4], x[0]))))
            for u, e in found.items()}


class Refreshed(NamedTuple):
    """One refresh: recommendation rows, users that could not be served, and why."""

    rows: pd.DataFrame           # SPEC §3 columns + reason
    unknown_users: List[str]     # not in the users table
    duplicate_users: List[str]   # another user id owns their e-mail (rule 14)
    unserved: pd.DataFrame       # too few eligible parts at every level
    signals: pd.DataFrame        # the served users with bought / carted / viewed (for QA)
    violations: Optional[Dict[int, int]] = None   # the handler's QA partials (`Serving` only)
    counters: Tuple[Tuple[str, int], ...] = ()    # the handler's counters (`Serving` only)
    unserved_reason: str = recommend.UNSERVED_REASON


class Serving(NamedTuple):
    """What scores one window like the batch job: a handler of `models.recommend_handler`.

    The plain-object half of Beam's ModelHandler/RunInference split, as the
    batch ``Recommend`` composite applies it per vehicle shard: ``handler`` is
    `recommend_handler.handler_for(config)` (segment popularity or the slot mix)
    or a `UnionRerankHandler` serving a ranker; ``loaded`` is what its ``load``
    built from the window's popularity and ``tables`` (the sources' shared tables
    at the window's end, `models.stream_sources`); ``model_version`` is what the
    rows it scores carry (the ranker artifact's version when one scored them).
    """

    handler: object
    loaded: object
    tables: Optional[object]
    model_version: str


def serving(reference: ReferenceData, pop: pd.DataFrame, handler, tables=None,
            model_version: Optional[str] = None) -> Serving:
    """Loads ``handler`` with the reference catalogue, one window's popularity and tables."""
    loaded = handler.load({"catalog": reference.catalog, "popularity": pop, "tables": tables})
    return Serving(handler, loaded, tables, model_version or handler.model_version)


def fitment_rows(reference: ReferenceData, users: pd.DataFrame,
                 attributes: Sequence[str]) -> pd.DataFrame:
    """The fitment rows of the users' vehicles (``sku`` + attributes), from `fitting`.

    The attribute values are the users' own, so the handler's vehicle keys of
    these rows are exactly the users' keys.
    """
    attrs = list(attributes)
    if not attrs or not len(users):
        return pd.DataFrame({"sku": pd.Series(dtype=object),
                             **{a: pd.Series(dtype=object) for a in attrs}})
    vehicles = users[attrs].drop_duplicates()
    keys = popularity.segment_keys(vehicles, attrs).to_numpy(object)
    rows = [(sku, *values) for key, values in zip(keys, vehicles.itertuples(index=False))
            for sku in sorted(reference.fitting.get(key, ()))]
    return pd.DataFrame(rows, columns=["sku", *attrs]).astype({"sku": object})


def _score_with(serving_: Serving, users: pd.DataFrame, events: pd.DataFrame,
                reference: ReferenceData, as_of: pd.Timestamp, config: RecsConfig):
    """The handler's ``score`` over the refreshed users, fed as the batch job feeds one shard."""
    from models import candidates
    from models.recommend_handler import MixHandler
    groups = {"users": users,
              "fitment": fitment_rows(reference, users, config.fitment_attributes)}
    if isinstance(serving_.handler, MixHandler):
        cands = config.candidates
        ab = cands.also_bought
        carts = (candidates.cart_affinity(users, ab.cart_weight, ab.max_carts)
                 if "also_bought" in cands.sources else None)
        lines = popularity.order_lines(events) if len(events) else events.iloc[:0]
        found = candidates.personal_candidates(
            lines, users["user_id"].tolist(), as_of, cands, serving_.tables,
            8 * config.rules.recs_per_user, carts)
        groups["candidates"] = found.merge(
            users[["user_id", *config.shard_attributes]], on="user_id", how="left")
    return serving_.handler.score(serving_.loaded, groups)


def refresh_users(requests: Mapping[str, RefreshRequest], reference: ReferenceData,
                  model, as_of: pd.Timestamp, config: RecsConfig) -> Refreshed:
    """Recommendations of the requested users at ``as_of``, as the batch job would make them.

    A user's signals (bought in the exclusion window, carted and viewed in the
    intent window) come from the history's events and the stream's, each
    event once. With a `Serving` (what the job passes), its handler scores them
    as the batch ``Recommend`` composite scores a vehicle shard: the mix's
    personal sources read the same events' order lines, its shared tables are
    the window's, and the handler applies the rules and the QA checks. A plain
    `Scorer` ranks with `recommend_all` (segment popularity only).
    """
    requested = sorted(requests)
    known = [u for u in requested if u in reference.servable.index]
    all_users = set(reference.users["user_id"])
    duplicates = [u for u in requested if u not in reference.servable.index and u in all_users]
    unknown = [u for u in requested if u not in all_users]
    users = reference.servable.loc[known].reset_index(drop=True)
    stream_frame = events_frame(
        {"user_id": user, "event_id": event_id, "event_name": name, "sku": sku,
         "order_id": order_id, "event_time_us": at}
        for user in known for event_id, name, sku, order_id, at in requests[user].events)
    events = pd.concat([reference.user_events(known), stream_frame], ignore_index=True)
    events = profiles.dedupe_events(events).rows if len(events) else empty_events()
    with_signals = profiles.attach_signals(users, events, as_of, config)
    if isinstance(model, Serving):
        scored = _score_with(model, with_signals, events, reference, as_of, config)
        recs = scored.rows.reset_index(drop=True)
        extra = dict(violations=scored.violations, counters=tuple(scored.counters),
                     unserved_reason=scored.reason)
        unserved = scored.unserved
    else:
        recs, unserved = recommend.recommend_all(model.recommender, with_signals,
                                                 reference.fitting)
        extra = {}
    recs = recs.assign(reason=recs["user_id"].map(
        lambda u: ",".join(requests[u].reasons)).astype(object))
    return Refreshed(recs, unknown, duplicates, unserved, with_signals, **extra)


# --- default picks of a vehicle (ranking changes) ---------------------------------------------

def default_picks(model: Scorer, reference: ReferenceData, vehicles: Sequence[str],
                  config: RecsConfig) -> Dict[str, Tuple]:
    """Each vehicle's recommendations for a user without signals: (source, sku, ...).

    The probe users (each vehicle's first servable user) are looked up in one
    indexing call: a lookup per vehicle cost 60% of the ranking (measured by
    bench/streaming_ranking.py).
    """
    group = list(config.group_attributes)
    if not len(vehicles):
        return {}
    first = [reference.vehicle_users[vehicle][0] for vehicle in vehicles]
    users = reference.servable.loc[first, ["user_id", "email_lower", *group]].reset_index(
        drop=True)
    recs, _ = recommend.recommend_all(model.recommender, users, reference.fitting)
    n = config.rules.recs_per_user
    parts = ["source"] + [f"rec_part_{i}" for i in range(1, n + 1)]
    keys = popularity.segment_keys(recs, group).to_numpy(object)
    return {k: tuple(row) for k, row in zip(keys, recs[parts].itertuples(index=False))}


# --- late data ---------------------------------------------------------------------------------

class WindowAudit(NamedTuple):
    """Elements of one event-time window: seen by the job vs included by the aggregation.

    ``too_late = seen - on_time - late``: elements that arrived after the
    window's allowed lateness and that the windowed aggregation dropped.
    """

    seen: int
    on_time: int
    late: int

    @property
    def too_late(self) -> int:
        return self.seen - self.on_time - self.late


# --- BigQuery ----------------------------------------------------------------------------------

def latest_rows_sql(table: str, keys: Sequence[str], order_by: str = "generated_at") -> str:
    """SQL returning each key's latest row of an append-only table (the body of a view).

    >>> print(latest_rows_sql("`p.d.t`", ["user_id"]))
    SELECT * EXCEPT (row_rank) FROM (
      SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY generated_at DESC) AS row_rank
      FROM `p.d.t`
    ) WHERE row_rank = 1
    """
    return ("SELECT * EXCEPT (row_rank) FROM (\n"
            f"  SELECT *, ROW_NUMBER() OVER (PARTITION BY {', '.join(keys)} "
            f"ORDER BY {order_by} DESC) AS row_rank\n"
            f"  FROM {table}\n"
            ") WHERE row_rank = 1")


def json_safe_rows(frame: pd.DataFrame) -> List[dict]:
    """Frame rows as dicts a BigQuery insert accepts: ISO-8601 times, None for missing."""
    out = {}
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            stamps = column.astype(TIME)
            out[name] = [None if pd.isna(t) else t.isoformat() for t in stamps]
        else:
            out[name] = [json_safe_value(v) for v in column.astype(object).tolist()]
    names = list(frame.columns)
    return [dict(zip(names, values)) for values in zip(*(out[n] for n in names))] if names else []


def json_safe_value(value):
    """One value as a BigQuery insert accepts it: ISO-8601 times, None for missing, text storable.

    Text that UTF-8 cannot encode is escaped (`storable`): one such value would
    otherwise fail every attempt to encode its row, and with it the bundle.

    >>> json_safe_value(pd.Timestamp("2026-05-01T10:00:00Z")), json_safe_value(np.int64(3))
    ('2026-05-01T10:00:00+00:00', 3)
    >>> json_safe_value(float("nan")) is None, json_safe_value(pd.NA) is None
    (True, True)
    """
    if isinstance(value, (list, tuple, np.ndarray)):
        return json.dumps([_plain(v) for v in value], default=str)
    value = _plain(value)
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, str):
        return storable(value)
    return value
