"""Arrow schemas of every output table: one definition for staging files and the warehouse."""
from __future__ import annotations

import pyarrow as pa

from models.recommend import rec_columns

TIMESTAMP = pa.timestamp("us", tz="UTC")
_TYPES = {"year": pa.int64(), "generated_at": TIMESTAMP}


def recommendations(n: int) -> pa.Schema:
    """SPEC §3 recommendation rows for ``n`` recommendations per user."""
    fields = []
    for name in rec_columns(n) + ["generated_at", "run_id", "model_version"]:
        if name in _TYPES:
            kind = _TYPES[name]
        elif name.endswith(("_price", "_score")):
            kind = pa.float64()
        else:
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


SEGMENT_POPULARITY = pa.schema([
    ("level", pa.string()), ("segment", pa.string()), ("sku", pa.string()),
    ("weight", pa.float64()), ("orders", pa.int64()),
])

DEAD_LETTER = pa.schema([
    ("table", pa.string()), ("step", pa.string()), ("reason", pa.string()),
    ("record", pa.string()),
])

QA_CHECKS = pa.schema([
    ("run_id", pa.string()), ("rule_id", pa.int64()), ("name", pa.string()),
    ("violations", pa.int64()),
])

PIPELINE_RUNS = pa.schema([
    ("run_id", pa.string()), ("job", pa.string()), ("as_of", TIMESTAMP),
    ("started_at", TIMESTAMP), ("finished_at", TIMESTAMP), ("status", pa.string()),
    ("message", pa.string()), ("users_read", pa.int64()), ("eligible_users", pa.int64()),
    ("recommendations_written", pa.int64()), ("dead_lettered", pa.int64()),
    ("deduplicated", pa.int64()), ("qa_violations", pa.int64()), ("counters", pa.string()),
])
