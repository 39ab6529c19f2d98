"""Writing a world: every table as JSON Lines or Parquet with bad rows planted at random
positions, plus the `world.json` manifest."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.world.contract import (ARROW_SCHEMAS, BAD_ID_PREFIX, BAD_KINDS, MISSING_FIELDS,
                                   TEXT_ONLY_KINDS, UNKNOWN_EVENT_NAMES, UNKNOWN_SKU_PREFIX)
from models.world.spec import World


def _py_column(column: pd.Series) -> list:
    """A column as Python values, None where missing (orjson writes null)."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "Ofbiu":
        return column.tolist()
    return column.astype(object).where(column.notna(), None).tolist()


def _records(frame: pd.DataFrame) -> List[dict]:
    """Rows of a frame as dicts of Python values."""
    columns = list(frame.columns)
    return [dict(zip(columns, row)) for row in zip(*(_py_column(frame[c]) for c in columns))]


def _bad_records(table: str, frame: pd.DataFrame, kinds: Tuple[str, ...], n: int, fmt: str,
                 rng: np.random.Generator) -> List[Tuple[str, object]]:
    """n bad rows of each kind, made from copies of real rows: (kind, dict or raw line).

    Rows that stay parseable get fresh keys so they never collide with real rows."""
    base = _records(frame.iloc[rng.integers(0, len(frame), n * len(kinds))])
    out: List[Tuple[str, object]] = []
    key = {"events": "event_id", "users": "user_id", "catalog": "sku"}.get(table)
    for i, row in enumerate(base):
        kind = kinds[i // n]
        if key:
            width = 9 if table == "events" else (6 if table == "users" else 4)
            row[key] = f"{BAD_ID_PREFIX[table]}{i + 1:0{width}d}"
        if kind == "malformed_json":
            out.append((kind, orjson.dumps(row)[:-1] + b",}"))
        elif kind == "truncated_line":
            line = orjson.dumps(row)
            out.append((kind, line[:len(line) // 2]))
        elif kind == "missing_field":
            field = MISSING_FIELDS[table][i % len(MISSING_FIELDS[table])]
            if fmt == "jsonl":
                del row[field]
            else:
                row[field] = None
            out.append((kind, row))
        elif kind == "unknown_event_name":
            out.append((kind, {**row, "event_name": UNKNOWN_EVENT_NAMES[i % 3]}))
        elif kind == "negative_price":
            out.append((kind, {**row, "price": -abs(row["price"] or 1.0)}))
        elif kind == "nan_price":
            if fmt == "jsonl":
                # orjson writes NaN as null; the feed's bug is the literal, non-standard NaN.
                out.append((kind, orjson.dumps({**row, "price": "__NaN__"})
                            .replace(b'"__NaN__"', b"NaN")))
            else:
                out.append((kind, {**row, "price": float("nan")}))
        elif kind == "unknown_sku":
            out.append((kind, {**row, "sku": f"{UNKNOWN_SKU_PREFIX}{i + 1:04d}"}))
    return out


def _write_jsonl(path: str, frame: pd.DataFrame, bad: List[Tuple[str, object]],
                 rng: np.random.Generator, chunk: int = 20_000) -> int:
    """Write JSON Lines with the bad rows at random positions; returns lines written.

    Rows are serialised in chunks so memory stays small and is reused."""
    dumps = orjson.dumps
    n = len(frame)
    positions = np.sort(rng.integers(0, n + 1, len(bad)))
    bad_lines = [p if isinstance(p, bytes) else dumps(p) for _, p in bad]
    j = 0
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            lines = [dumps(row) for row in _records(frame.iloc[start:start + chunk])]
            stop = start + len(lines)
            planted = 0
            while j < len(bad_lines) and positions[j] < stop:
                lines.insert(int(positions[j]) - start + planted, bad_lines[j])
                planted += 1
                j += 1
            f.write(b"\n".join(lines) + b"\n")
        if j < len(bad_lines):
            f.write(b"\n".join(bad_lines[j:]) + b"\n")
    return n + len(bad_lines)


def _write_parquet(path: str, table: str, frame: pd.DataFrame, bad: List[Tuple[str, object]],
                   rng: np.random.Generator, schemas: Optional[Dict[str, pa.Schema]] = None) -> int:
    """Write Parquet with the contract's types (or the world's own) and bad rows at random
    positions."""
    schema = (schemas or ARROW_SCHEMAS)[table]
    data = pa.Table.from_pandas(frame, preserve_index=False).select(schema.names).cast(schema)
    if bad:
        extra = pa.Table.from_pylist([row for _, row in bad], schema=schema)
        n = data.num_rows
        order = np.insert(np.arange(n), rng.integers(0, n + 1, len(bad)),
                          n + np.arange(len(bad)))
        data = pa.concat_tables([data, extra]).take(pa.array(order))
    pq.write_table(data, path, compression="snappy")
    return data.num_rows


def write_world(world: World, out_dir: str, fmt: str = "jsonl", bad_rows: int = 0) -> dict:
    """Write every table as `<table>.<fmt>` plus `world.json`; returns the written manifest.

    With bad_rows = N, N rows of each bad kind are planted in events, users, catalog and
    fitment (Parquet holds only the row-level kinds) and counted in the manifest."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"format must be jsonl or parquet, not {fmt!r}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([world.seed, 7919])
    bad_by_kind: Dict[str, Dict[str, int]] = {}
    written: Dict[str, int] = {}
    for table, frame in world.tables().items():
        kinds = tuple(k for k in BAD_KINDS.get(table, ())
                      if fmt == "jsonl" or k not in TEXT_ONLY_KINDS)
        bad = _bad_records(table, frame, kinds, bad_rows, fmt, rng) if bad_rows > 0 and kinds \
            and len(frame) else []
        if bad:
            bad_by_kind[table] = {k: bad_rows for k in kinds}
        path = os.path.join(out_dir, f"{table}.{fmt}")
        if fmt == "jsonl":
            written[table] = _write_jsonl(path, frame, bad, rng)
        else:
            written[table] = _write_parquet(path, table, frame, bad, rng, world.arrow_schemas)
    manifest = {**world.manifest, "format": fmt, "bad_rows_by_kind": bad_by_kind,
                "bad_rows_total": int(sum(sum(v.values()) for v in bad_by_kind.values())),
                "written_rows": written}
    with open(os.path.join(out_dir, "world.json"), "wb") as f:
        f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest
