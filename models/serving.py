"""The serving store: key layout, encoding, and the Redis operations every writer and reader shares.

Recommendations leave the warehouse for a key-value store (Redis; Memorystore
on Google Cloud) so a web page can ask for one user's list in a millisecond.
This module holds everything about that store except Beam: the Beam writers
(``transforms.serving``), the HTTP service and the rebuild command
(``pipelines.serve``) all go through :class:`ServingStore`, so the key layout
is written down once.

Key layout (``ns`` is the namespace, ``recs`` by default)::

    ns:current                 the version readers are served (one string)
    ns:meta:<version>          JSON: run_id, model_version, generated_at, users, state
    ns:u:<version>:<user_id>   one user's list in that version
    ns:s:<version>:<segment>   the fallback list of a segment (most common list there)
    ns:g:<version>             the global fallback list
    ns:live:<user_id>          a streaming refresh of one user (expires after a TTL)

A version is the batch run id that produced it. A publish writes a whole new
version beside the served one, then moves ``ns:current`` in one ``MULTI``:
readers see the old version or the new one, never a mix, because a read is
one Lua script (:data:`READ_SCRIPT`) that follows the pointer and fetches the
user's row, the user's streaming row and, when neither exists, a fallback,
atomically, in one round trip. Old versions are dropped with the warehouse
backups that hold the same output (:meth:`ServingStore.prune`), so a rollback
can switch the pointer back without reloading.

Payloads are compact JSON (orjson): ``{"s": source, "i": [[sku, score], ...]}``
with a third item field, the slot's source, when the run wrote per-slot
sources. Fields every row of a version shares (``generated_at``, ``run_id``,
``model_version``) live once in its meta; a streaming row carries its own.
Nothing here logs a user id or an e-mail: only counts.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import numpy as np
import orjson
import pandas as pd

NAMESPACE = "recs"
# Keys per MSET (batch) or per pipeline (streaming, SET with a TTL): big enough to amortise a
# round trip, small enough that one command never holds the server for more than a few ms.
WRITE_BATCH = 2_000
# A streaming row lives this long unless refreshed again; the nightly batch run has replaced
# it by then (its rows are newer), and a user who stopped buying does not grow the store.
LIVE_TTL_SECONDS = 8 * 86_400
MAX_USER_ID = 128
MAX_K = 100
LOADING, COMPLETE = "loading", "complete"
# Versions a store keeps: the served one and the one before it (a rollback by one run is a
# pointer switch); older backups stay in the warehouse, and a rollback to one reloads it.
KEEP_VERSIONS = 2
FALLBACK = "fallback"

# One round trip, atomic: pointer -> meta, the user's row, the user's streaming row, and a
# fallback only when the user has neither. ARGV: namespace, user id, segment ('' for none).
READ_SCRIPT = """
local ns = ARGV[1]
local v = redis.call('GET', ns .. ':current')
local live = redis.call('GET', ns .. ':live:' .. ARGV[2])
if not v then return {false, false, false, live, false} end
local meta = redis.call('GET', ns .. ':meta:' .. v)
local row = redis.call('GET', ns .. ':u:' .. v .. ':' .. ARGV[2])
local fb = false
if not row and not live then
  if ARGV[3] ~= '' then fb = redis.call('GET', ns .. ':s:' .. v .. ':' .. ARGV[3]) end
  if not fb then fb = redis.call('GET', ns .. ':g:' .. v) end
end
return {v, meta, row, live, fb}
"""


# --------------------------------------------------------------------------- layout

class Layout:
    """Key names of one namespace (see the module docstring)."""

    def __init__(self, namespace: str = NAMESPACE):
        if not namespace or not namespace.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"serving namespace {namespace!r}: use letters, digits, _ and -")
        self.ns = namespace

    @property
    def current(self) -> str:
        return f"{self.ns}:current"

    def meta(self, version: str) -> str:
        return f"{self.ns}:meta:{version}"

    def user(self, version: str, user_id: str) -> str:
        return f"{self.ns}:u:{version}:{user_id}"

    def segment(self, version: str, segment: str) -> str:
        return f"{self.ns}:s:{version}:{segment}"

    def global_list(self, version: str) -> str:
        return f"{self.ns}:g:{version}"

    def live(self, user_id: str) -> str:
        return f"{self.ns}:live:{user_id}"

    def version_patterns(self, version: str) -> List[str]:
        """SCAN patterns of every key of one version (versions are run ids: no glob characters)."""
        return [f"{self.ns}:u:{version}:*", f"{self.ns}:s:{version}:*"]


def valid_user_id(user_id: str) -> bool:
    """Whether ``user_id`` can be a user id: 1-128 printable characters, no whitespace.

    The data contracts refuse padded ids and control or invisible characters,
    so an id with any of them names no user: the service answers 400.

    >>> valid_user_id("U0006708"), valid_user_id(" U1"), valid_user_id("a\\u200bb")
    (True, False, False)
    """
    return (isinstance(user_id, str) and 0 < len(user_id) <= MAX_USER_ID
            and user_id.isprintable() and not any(c.isspace() for c in user_id))


def valid_version(version: str) -> bool:
    """A version is a run id (``pipelines.options.run_id_of``): letters, digits, ``_.-``."""
    return (isinstance(version, str) and 0 < len(version) <= 128
            and version.replace("_", "").replace(".", "").replace("-", "").isalnum())


# --------------------------------------------------------------------------- encoding

def stamp(value: Any) -> Optional[str]:
    """A time as the fixed-width UTC text every payload uses (so two stamps compare as text)."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _columns(frame: pd.DataFrame, n: int) -> Tuple[List[list], List[list], Optional[List[list]]]:
    """SKUs, scores (rounded to 6 decimals, NaN as None) and slot sources as Python lists."""
    skus = [frame[f"rec_part_{i}"].astype(object).where(frame[f"rec_part_{i}"].notna(), None)
            .tolist() for i in range(1, n + 1)]
    scores = []
    for i in range(1, n + 1):
        values = np.round(frame[f"rec{i}_score"].to_numpy(float), 6)
        scores.append(pd.Series(values).astype(object)
                      .where(np.isfinite(values), None).tolist())
    slot = ([frame[f"rec{i}_source"].astype(object).tolist() for i in range(1, n + 1)]
            if "rec1_source" in frame.columns else None)
    return skus, scores, slot


def slots_in(frame: pd.DataFrame) -> int:
    """How many ``rec_part_<i>`` columns a recommendations frame has."""
    n = 0
    while f"rec_part_{n + 1}" in frame.columns:
        n += 1
    return n


def encode_rows(frame: pd.DataFrame, with_run: bool = False) -> List[bytes]:
    """One payload per recommendations row (SPEC §3 columns), in row order.

    ``with_run`` adds ``generated_at``, ``run_id`` and ``model_version`` to
    each payload (streaming rows: each carries its own); batch rows leave them
    to the version's meta. Empty slots (fewer eligible SKUs than slots) are
    left out. Column-wise: the per-row work is one small list and one dumps.
    """
    n = slots_in(frame)
    skus, scores, slot = _columns(frame, n)
    sources = (frame["source"].astype(object).tolist() if "source" in frame.columns
               else [None] * len(frame))
    extra = None
    if with_run:
        times = pd.to_datetime(frame["generated_at"], utc=True)
        extra = list(zip(times.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").tolist(),
                         frame["run_id"].astype(object).tolist(),
                         frame["model_version"].astype(object).tolist()))
    out = []
    dumps = orjson.dumps
    for r in range(len(frame)):
        if slot is None:
            items = [[skus[i][r], scores[i][r]] for i in range(n) if skus[i][r] is not None]
        else:
            items = [[skus[i][r], scores[i][r], slot[i][r]] for i in range(n)
                     if skus[i][r] is not None]
        payload: Dict[str, Any] = {"s": sources[r], "i": items}
        if extra is not None:
            payload["g"], payload["r"], payload["m"] = extra[r]
        out.append(dumps(payload))
    return out


def fallback_lists(frame: pd.DataFrame) -> Tuple[Dict[str, bytes], Optional[bytes]]:
    """Segment and global fallback payloads from a published recommendations frame.

    A segment's fallback is the list most of its users got (already through
    every business rule and the segment's fitment); the global fallback is the
    list most users served by the ``global`` level got (no vehicle: universal
    parts). None when no user was served globally: better an empty answer
    than a list no rule has checked.
    """
    n = slots_in(frame)
    if not len(frame) or not n:
        return {}, None
    keys = [f"rec_part_{i}" for i in range(1, n + 1)]
    lists = frame[keys].astype(object).where(frame[keys].notna(), "")
    tuples = pd.Series(list(map(tuple, lists.to_numpy())), index=frame.index)
    segments: Dict[str, bytes] = {}
    has_segment = frame["segment"].notna() & (frame["segment"].astype(str) != "")
    picked = (pd.DataFrame({"segment": frame["segment"][has_segment],
                            "list": tuples[has_segment], "row": frame.index[has_segment]})
              .groupby(["segment", "list"], sort=True)
              .agg(users=("row", "size"), row=("row", "min"))
              .reset_index()
              .sort_values(["segment", "users", "list"], ascending=[True, False, True])
              .drop_duplicates("segment"))
    rows = frame.loc[picked["row"].to_numpy()]
    for segment, payload in zip(picked["segment"], encode_rows(rows)):
        segments[str(segment)] = _as_fallback(payload, "segment")
    glob = frame["source"].astype(str) == "global"
    if not glob.any():
        return segments, None
    counts = tuples[glob].value_counts()
    top = counts[counts == counts.iloc[0]].index.min()
    row = frame.loc[[tuples[glob][tuples[glob] == top].index[0]]]
    return segments, _as_fallback(encode_rows(row)[0], "global")


def _as_fallback(payload: bytes, level: str) -> bytes:
    data = orjson.loads(payload)
    return orjson.dumps({"s": FALLBACK, "f": level, "i": data["i"]})


def version_meta(run_id: str, model_version: str, generated_at: Any, users: int,
                 state: str = LOADING) -> bytes:
    return orjson.dumps({"run_id": run_id, "model_version": model_version,
                         "generated_at": stamp(generated_at), "users": int(users),
                         "state": state, "written_at": stamp(pd.Timestamp.now(tz="UTC"))})


def answer(user_id: str, k: int, version: Optional[bytes], meta: Optional[bytes],
           row: Optional[bytes], live: Optional[bytes], fallback: Optional[bytes]
           ) -> Optional[Dict[str, Any]]:
    """The API's JSON answer from what :data:`READ_SCRIPT` returned; None when nothing is served.

    The newer of the batch row and the streaming row wins (by ``generated_at``);
    with neither, the fallback (``source: fallback``) or an empty list. Before
    any batch publish (no version), only users with a streaming row are served.
    """
    if version is None and not live:
        return None
    info = orjson.loads(meta) if meta else {}
    chosen = orjson.loads(row) if row else None
    if chosen is not None:
        chosen.setdefault("g", info.get("generated_at"))
        chosen.setdefault("r", info.get("run_id"))
        chosen.setdefault("m", info.get("model_version"))
    if live:
        fresh = orjson.loads(live)
        if chosen is None or (fresh.get("g") or "") > (chosen.get("g") or ""):
            chosen = fresh
    fallback_level = None
    if chosen is None:
        chosen = orjson.loads(fallback) if fallback else {"s": FALLBACK, "f": "none", "i": []}
        fallback_level = chosen.get("f")
        chosen.update(g=info.get("generated_at"), r=info.get("run_id"),
                      m=info.get("model_version"))
    items = [{"sku": it[0], "score": it[1], **({"source": it[2]} if len(it) > 2 else {})}
             for it in chosen["i"][:k]]
    body = {"user_id": user_id, "source": chosen.get("s"), "items": items,
            "generated_at": chosen.get("g"), "run_id": chosen.get("r"),
            "model_version": chosen.get("m"),
            "version": version.decode() if version is not None else None}
    if fallback_level is not None:
        body["fallback"] = fallback_level
    return body


# --------------------------------------------------------------------------- the store

def parse_store_url(url: str) -> str:
    """``redis://host:port/db`` checked (a ValueError with one line when not)."""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as err:
        raise ValueError(f"--serving_store {url!r}: {err}") from None
    if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
        raise ValueError(f"--serving_store {url!r}: expected redis://HOST:PORT/DB")
    if parsed.scheme != "unix" and port is None:
        raise ValueError(f"--serving_store {url!r}: give the port, redis://HOST:PORT/DB")
    return url


class StoreUnavailable(Exception):
    """The store did not answer; ``str()`` is a short reason fit for a log line or a 503."""


class ServingStore:
    """One Redis database holding served versions (see the module docstring).

    Args:
        url: ``redis://host:port/db``.
        namespace: key prefix, so one database can hold several stores.
        timeout: seconds a command may take before the store counts as unreachable.
        keep_versions: versions :meth:`prune` leaves when the caller keeps them (None:
            every version the warehouse still backs up).
    """

    def __init__(self, url: str, namespace: str = NAMESPACE, timeout: float = 2.0,
                 keep_versions: Optional[int] = KEEP_VERSIONS):
        self.url = parse_store_url(url)
        self.keys = Layout(namespace)
        self.timeout = timeout
        self.keep_versions = keep_versions
        self._client = None
        self._read = None

    def __getstate__(self) -> Dict[str, Any]:  # a connection pool does not pickle
        return {**self.__dict__, "_client": None, "_read": None}

    @property
    def client(self):
        if self._client is None:
            import redis
            self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout,
                                                socket_connect_timeout=self.timeout)
        return self._client

    def check(self) -> None:
        """StoreUnavailable with a short reason unless the server answers PING."""
        import redis
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as err:
            raise StoreUnavailable(_reason(err)) from None

    # ---- writing a version

    def begin(self, version: str, run_id: str, model_version: str, generated_at: Any) -> None:
        """Mark ``version`` as being loaded (kept as is when a retried bundle calls it again)."""
        if not valid_version(version):
            raise ValueError(f"refusing serving version {version!r}")
        self.client.set(self.keys.meta(version),
                        version_meta(run_id, model_version, generated_at, 0), nx=True)

    def write_users(self, version: str, user_ids: Sequence[str],
                    payloads: Sequence[bytes], batch: int = WRITE_BATCH) -> int:
        """Write users' rows into ``version`` with one MSET per ``batch``, pipelined; returns rows.

        Rows whose user id could never be asked for (``valid_user_id``) are
        skipped and not counted; the batch job's contracts already refuse them.
        """
        written = 0
        pipe = self.client.pipeline(transaction=False)
        pending = 0
        chunk: Dict[str, bytes] = {}
        for user_id, payload in zip(user_ids, payloads):
            if not valid_user_id(user_id):
                continue
            chunk[self.keys.user(version, user_id)] = payload
            if len(chunk) >= batch:
                pipe.mset(chunk)
                written += len(chunk)
                chunk, pending = {}, pending + 1
                if pending >= 8:
                    pipe.execute()
                    pending = 0
        if chunk:
            pipe.mset(chunk)
            written += len(chunk)
        pipe.execute()
        return written

    def write_fallbacks(self, version: str, segments: Mapping[str, bytes],
                        global_list: Optional[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        items = list(segments.items())
        for start in range(0, len(items), WRITE_BATCH):
            pipe.mset({self.keys.segment(version, s): p for s, p in items[start:start + WRITE_BATCH]})
        if global_list is not None:
            pipe.set(self.keys.global_list(version), global_list)
        pipe.execute()

    def switch(self, version: str, users: Optional[int] = None) -> float:
        """Mark ``version`` complete and serve it, in one MULTI; returns the seconds it took.

        Refused (ValueError) when the version was never loaded.
        """
        started = time.perf_counter()
        raw = self.client.get(self.keys.meta(version))
        if raw is None:
            raise ValueError(f"serving store has no version {version!r}")
        meta = orjson.loads(raw)
        meta["state"] = COMPLETE
        meta["switched_at"] = stamp(pd.Timestamp.now(tz="UTC"))
        if users is not None:
            meta["users"] = int(users)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.meta(version), orjson.dumps(meta))
        pipe.set(self.keys.current, version)
        pipe.execute()
        return time.perf_counter() - started

    def write_live(self, payloads: Iterable[Tuple[str, bytes]],
                   ttl: int = LIVE_TTL_SECONDS) -> int:
        """Streaming rows (``(user_id, payload)``), each with a TTL, pipelined; returns rows."""
        pipe = self.client.pipeline(transaction=False)
        written = 0
        for user_id, payload in payloads:
            if not valid_user_id(user_id):
                continue
            pipe.set(self.keys.live(user_id), payload, ex=ttl)
            written += 1
            if written % WRITE_BATCH == 0:
                pipe.execute()
        pipe.execute()
        return written

    # ---- versions

    def current(self) -> Optional[str]:
        value = self.client.get(self.keys.current)
        return value.decode() if value is not None else None

    def meta(self, version: str) -> Optional[Dict[str, Any]]:
        raw = self.client.get(self.keys.meta(version))
        return orjson.loads(raw) if raw is not None else None

    def versions(self) -> Dict[str, Dict[str, Any]]:
        """Every version the store holds, with its meta."""
        prefix = self.keys.meta("")
        found = {}
        for key in self.client.scan_iter(match=prefix + "*", count=1000):
            version = key.decode()[len(prefix):]
            meta = self.meta(version)
            if meta is not None:
                found[version] = meta
        return found

    def complete(self, version: str) -> bool:
        meta = self.meta(version)
        return bool(meta) and meta.get("state") == COMPLETE

    def drop(self, version: str) -> int:
        """Delete every key of ``version`` (never the served one); returns keys deleted."""
        if version == self.current():
            raise ValueError(f"refusing to drop the served version {version!r}")
        deleted = 0
        for pattern in self.keys.version_patterns(version):
            batch: List[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=5_000):
                batch.append(key)
                if len(batch) >= 5_000:
                    deleted += self.client.unlink(*batch)
                    batch = []
            if batch:
                deleted += self.client.unlink(*batch)
        deleted += self.client.unlink(self.keys.global_list(version), self.keys.meta(version))
        return deleted

    def prune(self, keep: Iterable[str], max_versions: Optional[int] = None) -> List[str]:
        """Drop every version not in ``keep``, and beyond the ``max_versions`` most recently
        served of those (the served one always stays); returns the versions dropped.

        Each version costs the store a full copy of the users' lists, so it holds the
        served one and the last few before it; a rollback further back reloads from the
        warehouse (``transforms.serving.follow_warehouse``).
        """
        current = self.current()
        found = self.versions()
        held = sorted((v for v in found if v in set(keep) and v != current),
                      key=lambda v: (found[v].get("switched_at") or "",
                                     found[v].get("written_at") or "", v), reverse=True)
        if max_versions is not None:
            held = held[:max(0, max_versions - (1 if current else 0))]
        kept = set(held) | {current}
        dropped = sorted(v for v in found if v not in kept)
        for version in dropped:
            self.drop(version)
        return dropped

    # ---- reading

    def read(self, user_id: str, k: int, segment: str = "") -> Optional[Dict[str, Any]]:
        """The answer for one user (see :func:`answer`), in one round trip."""
        if self._read is None:
            self._read = self.client.register_script(READ_SCRIPT)
        found = self._read(args=[self.keys.ns, user_id, segment or ""])
        return answer(user_id, k, *found)

    def memory_bytes(self) -> int:
        return int(self.client.info("memory")["used_memory"])


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]


def frames_in_chunks(frame: pd.DataFrame, rows: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), rows):
        yield frame.iloc[start:start + rows]
