"""Schemas of every table: Arrow for staging files and DuckDB, BigQuery derived from them.

Each output table is defined once, as an Arrow schema; its BigQuery schema,
partitioning and clustering come from :func:`bigquery_table`, so the local and
the BigQuery warehouse cannot drift apart. Input tables (SPEC §2) are defined
once too, by the data contracts in ``models.contracts``.
"""
from __future__ import annotations

from typing import Dict, List

import pandas as pd
import pyarrow as pa

from models.contracts import SCHEMAS as CONTRACTS
from models.recommend import rec_columns, slot_source_columns
from models.stability import stability_report

TIMESTAMP = pa.timestamp("us", tz="UTC")
_TYPES = {"year": pa.int64(), "generated_at": TIMESTAMP}


def recommendations(n: int, slot_sources: bool = False) -> pa.Schema:
    """SPEC §3 recommendation rows for ``n`` recommendations per user.

    ``slot_sources`` adds ``rec1_source`` .. ``recN_source`` (which mix source
    filled each slot, #14) when the configured mix is more than segment popularity.
    """
    fields = []
    extra = slot_source_columns(n) if slot_sources else []
    for name in rec_columns(n) + extra + ["generated_at", "run_id", "model_version"]:
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

# One row per QA rule (ids 1-15, ``value`` = violations, ``threshold`` 0) and per sanity
# gate (ids 101+, ``models.sanity``: ``violations`` 1 when tripped, the measured value,
# the configured threshold and a line saying what was seen and what to do).
QA_CHECKS = pa.schema([
    ("run_id", pa.string()), ("rule_id", pa.int64()), ("name", pa.string()),
    ("violations", pa.int64()), ("value", pa.float64()), ("threshold", pa.float64()),
    ("detail", pa.string()),
])

PIPELINE_RUNS = pa.schema([
    ("run_id", pa.string()), ("job", pa.string()), ("as_of", TIMESTAMP),
    ("started_at", TIMESTAMP), ("finished_at", TIMESTAMP), ("status", pa.string()),
    ("message", pa.string()), ("users_read", pa.int64()), ("eligible_users", pa.int64()),
    ("recommendations_written", pa.int64()), ("dead_lettered", pa.int64()),
    ("deduplicated", pa.int64()), ("qa_violations", pa.int64()), ("counters", pa.string()),
    # What made the run (#19, models.provenance); NULL in rows written before these existed.
    ("source_commit", pa.string()), ("template_version", pa.string()),
    ("config_digest", pa.string()), ("model_version", pa.string()),
])

# Dead letters as logged: the staged rows plus the run that refused them.
DEAD_LETTER_LOG = DEAD_LETTER.append(pa.field("run_id", pa.string()))


def stability(n: int) -> pa.Schema:
    """The ``stability_report`` row: ``run_id`` then the figures of ``stability_report``.

    Derived from the function itself (on two empty outputs), so a figure added
    there is a column here.
    """
    empty = pd.DataFrame(columns=["email_lower"] + [f"rec_part_{i}" for i in range(1, n + 1)]
                         + [f"rec{i}_price" for i in range(1, n + 1)])
    figures = stability_report(empty, empty, n)
    return pa.schema([("run_id", pa.string())] + [
        (name, pa.int64() if isinstance(value, int) else pa.float64())
        for name, value in figures.items()])


# Why the lists changed (#19, ``models.stability.explain_changes``): one row per SKU swap,
# per reason users were lost, for the score change and per event name, in reading order.
STABILITY_CHANGES = pa.schema([
    ("run_id", pa.string()), ("rank", pa.int64()), ("kind", pa.string()),
    ("subject", pa.string()), ("users", pa.int64()), ("value_before", pa.float64()),
    ("value_after", pa.float64()), ("detail", pa.string()),
])


def outputs(n: int, slot_sources: bool = False) -> Dict[str, pa.Schema]:
    """Every table the batch job writes, by name, for ``n`` recommendations per user."""
    return {"recommendations": recommendations(n, slot_sources),
            "segment_popularity": SEGMENT_POPULARITY,
            "qa_checks": QA_CHECKS, "pipeline_runs": PIPELINE_RUNS,
            "dead_letter": DEAD_LETTER_LOG, "stability_report": stability(n),
            "stability_changes": STABILITY_CHANGES}


# --------------------------------------------------------------------------- BigQuery

_BIGQUERY_TYPES = {pa.string(): "STRING", pa.float64(): "FLOAT64", pa.int64(): "INT64",
                   pa.bool_(): "BOOL", TIMESTAMP: "TIMESTAMP"}
_CONTRACT_TYPES = {"str": "STRING", "float": "FLOAT64", "int": "INT64", "bool": "BOOL",
                   "time": "TIMESTAMP", "tags": "STRING"}

# Day partitions where a table grows by time or is read by a time window. Dead letters
# carry no time of their own, so their table is partitioned by ingestion time.
PARTITIONING: Dict[str, Dict[str, str]] = {
    "recommendations": {"type": "DAY", "field": "generated_at"},
    "pipeline_runs": {"type": "DAY", "field": "started_at"},
    "dead_letter": {"type": "DAY"},
    "events": {"type": "DAY", "field": "event_time"},
    "treatment_events": {"type": "DAY", "field": "event_time"},
}
# Clustering for the usual lookups: a user's row by e-mail, a segment's ranking.
CLUSTERING: Dict[str, List[str]] = {
    "recommendations": ["email_lower"],
    "segment_popularity": ["level", "segment"],
}


def bigquery_fields(schema: pa.Schema) -> List[Dict[str, str]]:
    """BigQuery field definitions (REST form) of an Arrow schema.

    >>> bigquery_fields(pa.schema([("sku", pa.string()), ("tags", pa.list_(pa.string()))]))
    [{'name': 'sku', 'type': 'STRING', 'mode': 'NULLABLE'}, \
{'name': 'tags', 'type': 'STRING', 'mode': 'REPEATED'}]
    """
    fields = []
    for field in schema:
        kind, mode = field.type, "NULLABLE" if field.nullable else "REQUIRED"
        if pa.types.is_list(kind):
            kind, mode = kind.value_type, "REPEATED"
        if kind not in _BIGQUERY_TYPES:
            raise TypeError(f"no BigQuery type for column {field.name!r} ({field.type})")
        fields.append({"name": field.name, "type": _BIGQUERY_TYPES[kind], "mode": mode})
    return fields


def bigquery_table(name: str, schema: pa.Schema) -> Dict[str, object]:
    """Schema, partitioning and clustering of table ``name`` (REST form).

    The same dictionary serves ``transforms.bigquery_io.InsertRows`` (which
    creates a missing table with ``google.cloud.bigquery.Table.from_api_repr``)
    and Beam's ``WriteToBigQuery`` (``schema`` and ``additional_bq_parameters``).
    """
    table: Dict[str, object] = {"schema": {"fields": bigquery_fields(schema)}}
    if name in PARTITIONING:
        table["timePartitioning"] = dict(PARTITIONING[name])
    if name in CLUSTERING:
        table["clustering"] = {"fields": list(CLUSTERING[name])}
    return table


def input_table(table: str) -> Dict[str, object]:
    """The BigQuery form of a SPEC §2 input, from its data contract (tags are REPEATED).

    Only the contract's fields are listed; a table may hold more. Every field is
    NULLABLE on purpose: a row missing a required field is the validator's to
    dead-letter with its reason, not the loader's to refuse.
    """
    fields = [{"name": c.name, "type": _CONTRACT_TYPES[c.kind],
               "mode": "REPEATED" if c.kind == "tags" else "NULLABLE"}
              for c in CONTRACTS[table]]
    spec: Dict[str, object] = {"schema": {"fields": fields}}
    if table in PARTITIONING:
        spec["timePartitioning"] = dict(PARTITIONING[table])
    return spec
