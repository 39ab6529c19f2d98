"""BigQuery sink benchmark: the project's InsertRows against Beam's WriteToBigQuery, on bqemulator.

    python bench/bigquery_sink.py           # 5,000 rows each -> bench/results/bigquery_sink.json
    python bench/bigquery_sink.py --rows 20000

Both write the same rows (the recommendations table's shape, from a tiny
world's batch output) by streaming inserts, in batches of 500, to a fresh
table each, in a Beam pipeline on the FnApiRunner in this process; bqemulator
runs as a subprocess. Reported: wall seconds of the pipeline and rows/s, the
rows found in the table afterwards (must equal the rows sent), and the ratio.
Beam's sink sizes every row with objsize (~1 ms a row in a profile); InsertRows
sends each batch through google-cloud-bigquery with a bounded retry.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import apache_beam as beam  # noqa: E402
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery  # noqa: E402
from apache_beam.io.gcp.bigquery_tools import RetryStrategy  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from transforms import bigquery as bq_switch, schemas  # noqa: E402
from transforms.bigquery_io import (INSERT_BATCH_ROWS, INSERT_RETRY_SECONDS,  # noqa: E402
                                    InsertRows)

RESULTS = os.path.join(ROOT, "bench", "results", "bigquery_sink.json")
TABLE = "recommendations"


def _rows(n: int) -> List[dict]:
    """``n`` rows of the recommendations table's schema (values vary, shapes do not)."""
    rows = []
    for i in range(n):
        row = {"user_id": f"U{i:07d}", "email_lower": f"user{i}@example.com", "make": "Ford",
               "model": "Mustang", "year": 2015 + i % 8, "segment": "Ford|Mustang|2015",
               "source": "make+model+year", "run_id": "bench",
               "generated_at": "2026-03-01T06:00:00Z"}
        for k in range(1, 5):
            row.update({f"rec_part_{k}": f"SKU{(i + k) % 997:05d}", f"rec{k}_price": 99.5 + k,
                        f"rec{k}_score": 5.0 - k, f"rec{k}_image_url": f"https://img/{k}.jpg",
                        f"rec{k}_part_type": "Header"})
        rows.append(row)
    return rows


def _table_resource() -> Dict:
    return schemas.bigquery_table(TABLE, schemas.outputs(4)[TABLE])


def _sink(kind: str, spec: str):
    table = _table_resource()
    if kind == "insert_rows":
        return beam.ParDo(InsertRows(spec, table, INSERT_BATCH_ROWS, INSERT_RETRY_SECONDS))
    layout = {k: v for k, v in table.items() if k != "schema"}
    return WriteToBigQuery(
        table=spec, schema=table["schema"], additional_bq_parameters=layout,
        create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
        write_disposition=BigQueryDisposition.WRITE_APPEND,
        method=WriteToBigQuery.Method.STREAMING_INSERTS,
        insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
        batch_size=INSERT_BATCH_ROWS)


def measure(kind: str, rows: List[dict], emulator) -> Dict:
    endpoint = f"http://{emulator.host}"
    options = PipelineOptions([f"--bigquery_endpoint={endpoint}",
                               f"--project={emulator.project}", "--runner=FnApiRunner"])
    bq_switch.apply_options(options)
    client = bq_switch.client(emulator.project, endpoint)
    client.create_dataset(f"{emulator.project}.bench", exists_ok=True)
    spec = f"{emulator.project}:bench.{TABLE}_{kind}"
    started = time.monotonic()
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create(rows) | kind >> _sink(kind, spec)
    seconds = time.monotonic() - started
    landed = next(iter(client.query(
        f"SELECT COUNT(*) AS n FROM `{emulator.project}.bench.{TABLE}_{kind}`").result()))["n"]
    return {"rows": len(rows), "landed": int(landed), "wall_seconds": round(seconds, 2),
            "rows_per_second": round(len(rows) / seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000)
    args = parser.parse_args(argv)
    from tests.emulators import bigquery_emulator
    rows = _rows(args.rows)
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "apache_beam": beam.__version__, "loadavg": list(os.getloadavg())},
        "code": {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                          capture_output=True, text=True).stdout.strip()},
    }
    with bigquery_emulator() as emulator:
        for kind in ("insert_rows", "beam_write_to_bigquery"):
            result[kind] = measure(kind, rows, emulator)
            print(kind, json.dumps(result[kind]), flush=True)
    result["ratio_insert_rows_over_beam_rows_per_second"] = round(
        result["insert_rows"]["rows_per_second"]
        / result["beam_write_to_bigquery"]["rows_per_second"], 2)
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    print(f"ratio {result['ratio_insert_rows_over_beam_rows_per_second']}x; "
          f"wrote {os.path.relpath(RESULTS, ROOT)}")
    return 0 if all(result[k]["landed"] == result[k]["rows"]
                    for k in ("insert_rows", "beam_write_to_bigquery")) else 1


if __name__ == "__main__":
    sys.exit(main())
