"""The recommendations API over the serving store, and the commands that manage the store.

    python -m pipelines.serve run --serving_store redis://127.0.0.1:6390/0 --port 8080
    python -m pipelines.serve rebuild --serving_store redis://127.0.0.1:6390/0 \\
        --warehouse out/warehouse.duckdb
    python -m pipelines.serve status --serving_store redis://127.0.0.1:6390/0

``run`` starts the HTTP service (Starlette on uvicorn):

* ``GET /v1/users/{user_id}/recommendations?k=&segment=`` -> 200 with the
  user's list (``items``: sku, score, and the slot's source when the run
  wrote one), ``source``, ``generated_at``, ``run_id``, ``model_version`` and
  the store ``version``. A user without a row gets the fallback list of
  ``segment`` if given (the segment key as the recommendations table writes
  it, e.g. ``ACURA|TSX|2006``), else the global one, with ``source:
  fallback`` (200). A malformed id, ``k`` or ``segment`` -> 400; the store
  unreachable, or nothing published yet -> 503 with a short JSON reason.
  Every error is one JSON object; never a stack trace.
* ``GET /healthz`` -> 200 when the store answers and serves a version, else 503.
* ``GET /metrics`` -> Prometheus text: requests by route and status, a
  latency histogram, answers by source, the age of the data served and the
  version served.

``rebuild`` loads the warehouse's published table into the store and serves it
(after a lost or flushed store); ``status`` prints what the store serves.
Exit status: 0 done, 2 refused (bad flag, unreachable store or warehouse,
nothing published), 3 failure.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import orjson

from models.serving import (KEEP_VERSIONS, MAX_K, NAMESPACE, ServingStore,
                            StoreUnavailable, parse_store_url, valid_user_id)
from pipelines.warehouse_args import add_warehouse_arguments

# No Beam here (nor pipelines.jobs, which imports it): the service's image and its workers
# need only the store client, Starlette and uvicorn. ``rebuild`` imports the warehouse lazily.

# Latency buckets (seconds) of the request histogram: the target is a few milliseconds.
BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
MAX_SEGMENT = 200
ENV_STORE, ENV_NAMESPACE, ENV_TIMEOUT = ("SERVING_STORE", "SERVING_NAMESPACE",
                                         "SERVING_TIMEOUT_SECONDS")


class Metrics:
    """Counters and one latency histogram per route, rendered as Prometheus text.

    Bounded: routes are the three fixed ones (any other path counts as
    ``other``), statuses a handful, sources the segment levels plus fallback.
    """

    def __init__(self):
        self.requests: Dict[Tuple[str, int], int] = {}
        self.latency: Dict[str, List[int]] = {}
        self.latency_sum: Dict[str, float] = {}
        self.sources: Dict[str, int] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
        counts = self.latency.get(route)
        if counts is None:
            counts = self.latency[route] = [0] * (len(BUCKETS) + 1)
            self.latency_sum[route] = 0.0
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum[route] += seconds

    def answered(self, source: Optional[str]) -> None:
        key = str(source)[:40]
        if key in self.sources or len(self.sources) < 50:
            self.sources[key] = self.sources.get(key, 0) + 1

    def render(self, store_info: Dict[str, object]) -> str:
        lines = ["# HELP serving_requests_total Requests by route and HTTP status.",
                 "# TYPE serving_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'serving_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# HELP serving_request_seconds Request latency inside the service.",
                  "# TYPE serving_request_seconds histogram"]
        for route, counts in sorted(self.latency.items()):
            total = 0
            for bound, n in zip(BUCKETS + (float("inf"),), counts):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'serving_request_seconds_bucket{{route="{route}",le="{le}"}} '
                             f'{total}')
            lines.append(f'serving_request_seconds_sum{{route="{route}"}} '
                         f'{self.latency_sum[route]:.6f}')
            lines.append(f'serving_request_seconds_count{{route="{route}"}} {total}')
        lines += ["# HELP serving_answers_total Recommendation answers by source (fallback: "
                  "users without a row).", "# TYPE serving_answers_total counter"]
        for source, n in sorted(self.sources.items()):
            lines.append(f'serving_answers_total{{source="{_label(source)}"}} {n}')
        lines += ["# HELP serving_store_up 1 when the store answered this scrape.",
                  "# TYPE serving_store_up gauge", f"serving_store_up {store_info['up']}"]
        if store_info.get("version"):
            lines += ["# HELP serving_version_info The version (batch run) served.",
                      "# TYPE serving_version_info gauge",
                      f'serving_version_info{{version="{_label(store_info["version"])}",'
                      f'run_id="{_label(store_info.get("run_id"))}",'
                      f'model_version="{_label(store_info.get("model_version"))}"}} 1']
        if store_info.get("age") is not None:
            lines += ["# HELP serving_data_age_seconds Age of the served version's data "
                      "(now - its generated_at).", "# TYPE serving_data_age_seconds gauge",
                      f"serving_data_age_seconds {store_info['age']:.3f}"]
        return "\n".join(lines) + "\n"


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def create_app(store: ServingStore, max_k: int = MAX_K):
    """The Starlette application answering from ``store``."""
    import redis
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    metrics = Metrics()
    store_errors = (redis.RedisError, OSError, StoreUnavailable)

    def json(status: int, body: object) -> Response:
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    async def recommendations(request) -> Response:
        started = time.perf_counter()
        response = _recommend(request)
        metrics.observe("recommendations", response.status_code, time.perf_counter() - started)
        return response

    def _recommend(request) -> Response:
        user_id = request.path_params["user_id"]
        if not valid_user_id(user_id):
            return json(400, {"error": "malformed user id",
                              "detail": "1-128 printable characters, no whitespace"})
        query = request.query_params
        k = max_k
        if "k" in query:
            text = query["k"]
            if not text.isdigit() or not 1 <= int(text) <= max_k:
                return json(400, {"error": "malformed k", "detail": f"an integer 1-{max_k}"})
            k = int(text)
        segment = query.get("segment", "")
        if len(segment) > MAX_SEGMENT or not segment.isprintable():
            return json(400, {"error": "malformed segment",
                              "detail": f"at most {MAX_SEGMENT} printable characters"})
        try:
            body = store.read(user_id, k, segment)
        except store_errors as err:
            return json(503, {"error": "store unavailable", "reason": _short(err)})
        if body is None:
            return json(503, {"error": "nothing published yet",
                              "reason": "the serving store has no current version"})
        metrics.answered(body["source"])
        return json(200, body)

    async def healthz(request) -> Response:
        started = time.perf_counter()
        try:
            version = store.current()
            response = (json(200, {"status": "ok", "version": version}) if version else
                        json(503, {"status": "unavailable", "reason": "nothing published"}))
        except store_errors as err:
            response = json(503, {"status": "unavailable", "reason": _short(err)})
        metrics.observe("healthz", response.status_code, time.perf_counter() - started)
        return response

    async def metrics_page(request) -> Response:
        info: Dict[str, object] = {"up": 0}
        try:
            version = store.current()
            info["up"] = 1
            meta = store.meta(version) if version else None
            if meta:
                info.update(version=version, run_id=meta.get("run_id"),
                            model_version=meta.get("model_version"))
                if meta.get("generated_at"):
                    import pandas as pd
                    info["age"] = (pd.Timestamp.now(tz="UTC")
                                   - pd.Timestamp(meta["generated_at"])).total_seconds()
        except store_errors:
            pass
        return Response(metrics.render(info), media_type="text/plain; version=0.0.4")

    async def http_error(request, exc: HTTPException) -> Response:
        metrics.observe("other", exc.status_code, 0.0)
        return json(exc.status_code, {"error": str(exc.detail)})

    async def crash(request, exc: Exception) -> Response:
        # Never a stack trace to the caller; the type only, for the operator's logs.
        metrics.observe("other", 500, 0.0)
        return json(500, {"error": "internal error", "reason": type(exc).__name__})

    return Starlette(routes=[
        Route("/v1/users/{user_id}/recommendations", recommendations, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: crash})


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def app_from_env():
    """The application configured from the environment (uvicorn's factory, one per worker)."""
    store = ServingStore(os.environ[ENV_STORE], os.environ.get(ENV_NAMESPACE, NAMESPACE),
                         timeout=float(os.environ.get(ENV_TIMEOUT, "0.5")))
    return create_app(store)


# --------------------------------------------------------------------------- commands

class OneLineParser(argparse.ArgumentParser):
    """A mistake is one line on stderr and exit 2 (``pipelines.jobs.OneLineParser``'s rule,
    without importing Beam)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    store = OneLineParser(add_help=False)
    group = store.add_argument_group("serving store")
    group.add_argument("--serving_store", default=os.environ.get(ENV_STORE),
                       help=f"Redis URL redis://HOST:PORT/DB (default: ${ENV_STORE}).")
    group.add_argument("--serving_namespace", default=os.environ.get(ENV_NAMESPACE, NAMESPACE),
                       help="Key prefix of the store's keys.")
    parser = OneLineParser(prog="python -m pipelines.serve",
                           description=__doc__.split("\n\n")[0],
                           epilog="Exit status: 0 done, 2 refused (bad flag, unreachable store "
                                  "or warehouse, nothing published), 3 failure. The API and "
                                  "the store: docs/serving.md.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[store], help="Start the HTTP service.")
    run.add_argument("--host", default="0.0.0.0", help="Address to listen on.")
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")),
                     help="Port to listen on (default: $PORT, else 8080).")
    run.add_argument("--workers", type=int, default=int(os.environ.get("SERVING_WORKERS", "1")),
                     help="Worker processes, one per core to use (default: $SERVING_WORKERS, "
                          "else 1).")
    run.add_argument("--timeout_seconds", type=float, default=0.5,
                     help="A store command slower than this answers 503.")
    rebuild = commands.add_parser("rebuild", parents=[store],
                                  help="Load the warehouse's published output and serve it.")
    rebuild.add_argument("--serving_keep_versions", type=int, default=KEEP_VERSIONS,
                         help="Versions the store keeps afterwards (the served one included).")
    add_warehouse_arguments(rebuild)
    commands.add_parser("status", parents=[store], help="Print the version served and "
                                                        "the versions held.")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if not args.serving_store:
        print(f"refused: --serving_store (or ${ENV_STORE}) is required", file=sys.stderr)
        return 2
    try:
        parse_store_url(args.serving_store)
        if args.command == "run":
            return _run(args)
        store = ServingStore(args.serving_store, args.serving_namespace,
                             keep_versions=getattr(args, "serving_keep_versions", KEEP_VERSIONS))
        if store.keep_versions < 1:
            raise ValueError("--serving_keep_versions must be >= 1")
        store.check()
        if args.command == "status":
            return _status(store)
        return _rebuild(args, store)
    except (ValueError, StoreUnavailable) as err:
        print(f"refused: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:  # pipelines.jobs.UsageError: e.g. the warehouse is in use
        if isinstance(err.code, int) or err.code is None:
            raise
        print(f"refused: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import uvicorn
    if args.workers < 1 or not 0 < args.timeout_seconds <= 30:
        raise ValueError("--workers must be >= 1 and --timeout_seconds in (0, 30]")
    os.environ[ENV_STORE] = args.serving_store
    os.environ[ENV_NAMESPACE] = args.serving_namespace
    os.environ[ENV_TIMEOUT] = str(args.timeout_seconds)
    print(f"serving {args.serving_store} on http://{args.host}:{args.port} "
          f"({args.workers} worker(s))", file=sys.stderr, flush=True)
    uvicorn.run("pipelines.serve:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning", access_log=False)
    return 0


def _status(store: ServingStore) -> int:
    current = store.current()
    print(f"serving store {store.url}: serves {current or 'nothing'}")
    for version, meta in sorted(store.versions().items()):
        mark = "*" if version == current else " "
        print(f" {mark} {version}: {meta.get('state')}, {meta.get('users'):,} users, "
              f"model {meta.get('model_version')}, generated {meta.get('generated_at')}")
    return 0


def _rebuild(args: argparse.Namespace, store: ServingStore) -> int:
    from pipelines.jobs import locked_warehouse
    from pipelines.publish import warehouse_from
    from transforms.serving import follow_warehouse
    from transforms.warehouse import LocalWarehouse
    warehouse = warehouse_from(args)
    with (locked_warehouse(args.warehouse, "serve rebuild")
          if isinstance(warehouse, LocalWarehouse) else contextlib.nullcontext()):
        done = follow_warehouse(store, warehouse, reload=True)
    rate = done["users"] / done["seconds"] if done["seconds"] else 0.0
    print(f"serving store {store.url}: loaded run {done['run_id']} from {warehouse.location} "
          f"({done['users']:,} users, {done['segments']:,} segment fallbacks, "
          f"{done['seconds']:.1f} s, {rate:,.0f} rows/s), switched in "
          f"{done['switch_seconds'] * 1000:.1f} ms; dropped {len(done['pruned'])} old "
          f"version(s)")
    return 0


def _entry(argv: List[str]) -> int:
    """``main`` with any crash as one line and exit 3 (never a traceback on the terminal)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001
        print(f"failed: {type(err).__name__}: {_short(err)}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))
