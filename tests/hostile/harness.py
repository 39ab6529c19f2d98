"""The hostile corpus (issue #13): hand-written cases with expected verdicts, and their scoring.

Each ``<table>.jsonl`` file beside this module holds one case per line::

    {"line": "<raw record text>", "expect": "accept" | "dedup" | "ineligible:<keys>"
                                           | "dead:<keys>", "why": "..."}

The verdict is kept out of the record so the record is exactly what a
producer would write. ``line_hex`` replaces ``line`` for bytes that are not
UTF-8; ``fill`` (``{"@X@": [text, times]}``) builds huge records without
storing them. ``pubsub.jsonl`` holds messages: ``table``, ``data`` (or
``data_hex``), ``attributes``, and ``stage: "reference"`` for a message the
parser passes and the reference-data check (unknown SKU, a click without a
send) must refuse.

Reasons are matched by keyword (``dead:email``; ``|`` separates alternatives,
``&`` joins keywords that must all appear, case-insensitive), so wording
tweaks do not break the corpus, but a dead letter without a fitting reason
does. Outcomes are scored into the figures of docs/reliability.md: tried,
accepted as expected, dead-lettered with the expected reason, dead-lettered
for another reason, wrongly accepted, wrongly refused, lost, crashed.

The batch side applies exactly what the batch job applies to a table:
`contracts.parse_json_line` and `contracts.validate`, then the job's table
checks (catalogue conflicts and rule eligibility, unknown SKUs, duplicate
event ids, duplicate e-mails, the campaign funnel) against the world the
corpus is appended to.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models import campaign, catalog, contracts, profiles
from models.config import RecsConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TABLES = ("catalog", "fitment", "users", "events", "treatment_events")
PUBSUB = "pubsub"

# Outcome kinds.
ACCEPT, DEDUP, INELIGIBLE, DEAD, LOST, CRASH = (
    "accept", "dedup", "ineligible", "dead", "lost", "crash")

# Figures, in the order of the table in docs/reliability.md.
FIGURES = ("tried", "accepted", "dead_lettered_as_expected", "dead_lettered_other_reason",
           "wrongly_accepted", "wrongly_refused", "lost", "crashed")


@dataclass(frozen=True)
class Case:
    """One hand-written line (or Pub/Sub message) and what must become of it."""

    table: str
    number: int             # 1-based line of the cases file
    raw: bytes
    expect: str
    why: str
    attributes: Optional[Dict[str, str]] = None
    stage: str = "parse"    # "reference": refused only by the reference-data check

    @property
    def label(self) -> str:
        return f"{self.table}:{self.number}"


@dataclass
class Outcome:
    """What a harness or a job did with one case."""

    kind: str
    reason: str = ""


def _materialise(row: Mapping, text_key: str, hex_key: str) -> bytes:
    if hex_key in row:
        return bytes.fromhex(row[hex_key])
    text = row[text_key]
    for marker, (piece, times) in (row.get("fill") or {}).items():
        text = text.replace(marker, piece * int(times))
    # A lone surrogate can only arrive as a JSON escape; raw text here is always encodable.
    return text.encode("utf-8")


def load_cases(table: str) -> List[Case]:
    """The cases of one input table, raw lines materialised as bytes."""
    out = []
    with open(os.path.join(HERE, f"{table}.jsonl"), encoding="ascii") as handle:
        for number, text in enumerate(handle, 1):
            row = json.loads(text)
            out.append(Case(table, number, _materialise(row, "line", "line_hex"),
                            row["expect"], row["why"]))
    return out


def load_messages() -> List[Case]:
    """The Pub/Sub cases, each with its table, payload bytes and attributes."""
    out = []
    with open(os.path.join(HERE, f"{PUBSUB}.jsonl"), encoding="ascii") as handle:
        for number, text in enumerate(handle, 1):
            row = json.loads(text)
            out.append(Case(row["table"], number, _materialise(row, "data", "data_hex"),
                            row["expect"], row["why"], row.get("attributes"),
                            row.get("stage", "parse")))
    return out


# --- verdicts ---------------------------------------------------------------------------

def expected_kind(expect: str) -> str:
    return expect.split(":", 1)[0]


def reason_matches(expect: str, reason: str) -> bool:
    """Whether ``reason`` has the keywords of ``expect`` (``dead:a&b|c``); a reason is required."""
    if ":" not in expect:
        return True
    if not isinstance(reason, str) or not reason.strip():
        return False
    reason = reason.lower()
    return any(all(k.strip().lower() in reason for k in alt.split("&"))
               for alt in expect.split(":", 1)[1].split("|"))


def judge(expect: str, outcome: Outcome) -> str:
    """The figure a case counts under (see `FIGURES`)."""
    want, got = expected_kind(expect), outcome.kind
    if got in (LOST, CRASH):
        return {LOST: "lost", CRASH: "crashed"}[got]
    if want == DEAD:
        if got == DEAD:
            return ("dead_lettered_as_expected" if reason_matches(expect, outcome.reason)
                    else "dead_lettered_other_reason")
        return "wrongly_accepted"
    if got == DEAD:
        return "wrongly_refused"
    if want == INELIGIBLE:
        if got == INELIGIBLE and reason_matches(expect, outcome.reason):
            return "accepted"
        # Eligible when it must never be sent: in the e-mail's candidates.
        return "wrongly_accepted" if got == ACCEPT else "dead_lettered_other_reason"
    if got == want:
        return "accepted"
    # accept vs dedup vs ineligible: kept, but not as expected.
    return "wrongly_refused" if got in (DEDUP, INELIGIBLE) else "wrongly_accepted"


def figures(cases: Sequence[Case], outcomes: Sequence[Outcome]) -> Dict[str, int]:
    counts = Counter(judge(c.expect, o) for c, o in zip(cases, outcomes))
    out = {"tried": len(cases)}
    out.update({name: int(counts.get(name, 0)) for name in FIGURES[1:]})
    return out


def mismatches(cases: Sequence[Case], outcomes: Sequence[Outcome]) -> List[str]:
    """One line per case whose outcome is not its expected verdict."""
    lines = []
    for c, o in zip(cases, outcomes):
        verdict = judge(c.expect, o)
        if verdict not in ("accepted", "dead_lettered_as_expected"):
            lines.append(f"{c.label} {verdict}: expected {c.expect!r}, got {o.kind} "
                         f"{o.reason!r} ({c.why})")
    return lines


# --- the batch side -----------------------------------------------------------------------

@dataclass
class World:
    """The valid rows of the world the corpus is appended to (context for table checks)."""

    catalog: pd.DataFrame
    users: pd.DataFrame
    treatment_events: pd.DataFrame

    @classmethod
    def read(cls, directory: str) -> "World":
        frames = {}
        for table in ("catalog", "users", "treatment_events"):
            with open(os.path.join(directory, f"{table}.jsonl"), "rb") as handle:
                records = [contracts.parse_json_line(line)[0] for line in handle if line.strip()]
            frames[table] = contracts.validate(
                table, contracts.records_frame(table, [r for r in records if r])).rows
        return cls(**frames)


def _validate_isolating(table: str, records: List[dict], limits
                        ) -> Tuple[contracts.Validated, Dict[int, str]]:
    """`contracts.validate` over the batch; if it raises, the records that make it raise.

    The job validates a whole batch at once, so one poisoned record would stop
    it: such records are reported as crashes, and the others validated without them.
    """
    try:
        return contracts.validate(table, contracts.records_frame(table, records), limits), {}
    except Exception:  # noqa: BLE001 - a crash is what is being measured
        crashed = {}
        for i, record in enumerate(records):
            try:
                contracts.validate(table, contracts.records_frame(table, [record]), limits)
            except Exception as err:  # noqa: BLE001
                crashed[i] = f"{type(err).__name__}: {err}"[:200]
        keep = [r for i, r in enumerate(records) if i not in crashed]
        if not keep:
            empty = contracts.validate(table, contracts.records_frame(table, [{}]), limits)
            return contracts.Validated(empty.rows.iloc[:0], np.array([], int),
                                       np.array([], object)), crashed
        checked = contracts.validate(table, contracts.records_frame(table, keep), limits)
        # Positions back in the numbering of ``records``.
        index = [i for i in range(len(records)) if i not in crashed]
        return contracts.Validated(
            checked.rows, np.array([index[p] for p in checked.bad_positions], int),
            checked.bad_reasons), crashed


def batch_outcomes(table: str, cases: Sequence[Case], world: World,
                   config: Optional[RecsConfig] = None,
                   known_skus: Optional[Iterable[str]] = None) -> List[Outcome]:
    """Every case of one table through the batch job's parse, validation and table checks.

    ``known_skus`` are the catalogue's SKUs after the corpus's catalogue
    rows were added (for fitment and events); `catalog_skus` computes them.
    """
    config = config or RecsConfig()
    outcomes: List[Optional[Outcome]] = [None] * len(cases)
    records, where = [], []
    for i, case in enumerate(cases):
        try:
            # What ParseJsonLinesFn does to each line: a BOM that starts it is not data.
            record, reason = contracts.parse_json_line(contracts.strip_bom(case.raw))
        except Exception as err:  # noqa: BLE001
            outcomes[i] = Outcome(CRASH, f"{type(err).__name__}: {err}"[:200])
            continue
        if record is None:
            outcomes[i] = Outcome(DEAD, reason)
        else:
            records.append(record)
            where.append(i)
    checked, crashed = _validate_isolating(table, records, config.inputs)
    for p, message in crashed.items():
        outcomes[where[p]] = Outcome(CRASH, message)
    for p, reason in zip(checked.bad_positions, checked.bad_reasons):
        outcomes[where[int(p)]] = Outcome(DEAD, str(reason))
    valid_positions = [where[p] for p in range(len(records))
                       if p not in crashed and p not in set(int(b) for b in checked.bad_positions)]
    rows = checked.rows.assign(_case=np.asarray(valid_positions, dtype=np.int64))
    for i, outcome in _table_checks(table, rows, world, config, known_skus).items():
        outcomes[i] = outcome
    return [o if o is not None else Outcome(LOST, "no outcome") for o in outcomes]


def catalog_skus(world: World, corpus_rows: pd.DataFrame) -> set:
    """SKUs of the resolved catalogue: the world's plus the corpus's accepted rows."""
    both = pd.concat([world.catalog, corpus_rows.drop(columns="_case", errors="ignore")],
                     ignore_index=True)
    return set(catalog.resolve_conflicts(both).catalog["sku"])


def _row_key(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    return frame[list(columns)].astype(object).apply(lambda r: repr(tuple(r)), axis=1)


def _table_checks(table: str, rows: pd.DataFrame, world: World, config: RecsConfig,
                  known_skus) -> Dict[int, Outcome]:
    """Outcome per valid case after the job's table-level checks."""
    out = {int(i): Outcome(ACCEPT) for i in rows["_case"]}
    if not len(rows):
        return out
    contract = [c.name for c in contracts.SCHEMAS[table]]
    if table == "catalog":
        both = pd.concat([world.catalog.assign(_case=-1), rows], ignore_index=True)
        key = _row_key(both, contract)
        # Identical repeats are duplicates: the first copy counts, the others are deduplicated.
        repeat = key.duplicated(keep="first").to_numpy(bool)
        for i in both.loc[repeat, "_case"]:
            if i >= 0:
                out[int(i)] = Outcome(DEDUP)
        resolved = catalog.resolve_conflicts(both.drop(columns="_case"))
        lost = dict(zip(_row_key(resolved.conflicts, contract), resolved.conflicts["reason"]))
        for i, k in zip(both["_case"], key):
            if i >= 0 and k in lost and out[int(i)].kind == ACCEPT:
                out[int(i)] = Outcome(DEAD, lost[k])
        kept = resolved.catalog.assign(_key=_row_key(resolved.catalog, contract))
        why = dict(zip(kept["_key"], catalog.ineligibility_reasons(kept, config.rules)))
        for i, k in zip(both["_case"], key):
            if i >= 0 and out[int(i)].kind == ACCEPT and why.get(k):
                out[int(i)] = Outcome(INELIGIBLE, why[k])
    elif table in ("fitment", "events"):
        known = known_skus if known_skus is not None else set(world.catalog["sku"])
        unknown = contracts.unknown_sku_mask(rows["sku"], known)
        for i in rows.loc[unknown, "_case"]:
            out[int(i)] = Outcome(DEAD, "unknown sku")
        rows = rows.loc[~unknown]
        if table == "events":
            kept = set(profiles.dedupe_events(rows).rows["_case"])
        else:
            kept = set(rows.drop_duplicates(["sku", *config.fitment_attributes])["_case"])
        for i in rows["_case"]:
            if int(i) not in kept:
                out[int(i)] = Outcome(DEDUP)
    elif table == "users":
        both = pd.concat([world.users.assign(_case=-1), rows], ignore_index=True)
        flagged = profiles.mark_duplicate_users(both, "email_lower")
        for i in flagged.loc[flagged["is_duplicate"] & (flagged["_case"] >= 0), "_case"]:
            out[int(i)] = Outcome(DEDUP)
    elif table == "treatment_events":
        both = pd.concat([world.treatment_events.assign(_case=-1), rows], ignore_index=True)
        check = campaign.check_funnel(both)
        for i, refusal in zip(check.rejected["_case"], check.rejected["refusal"]):
            if i >= 0:
                out[int(i)] = Outcome(DEAD, refusal)
        for i in check.repeats["_case"]:
            if i >= 0:
                out[int(i)] = Outcome(DEDUP)
    return out


def all_batch_outcomes(world: World, config: Optional[RecsConfig] = None
                       ) -> Dict[str, Tuple[List[Case], List[Outcome]]]:
    """Every input table's cases and outcomes (catalogue first: the others need its SKUs)."""
    config = config or RecsConfig()
    result = {}
    cases = load_cases("catalog")
    outcomes = batch_outcomes("catalog", cases, world, config)
    result["catalog"] = (cases, outcomes)
    accepted = [json.loads(c.raw.decode("utf-8").lstrip("\ufeff"))
                for c, o in zip(cases, outcomes) if o.kind in (ACCEPT, INELIGIBLE, DEDUP)]
    corpus_rows = contracts.validate("catalog", contracts.records_frame("catalog", accepted),
                                     config.inputs).rows
    known = catalog_skus(world, corpus_rows)
    for table in TABLES[1:]:
        cases = load_cases(table)
        result[table] = (cases, batch_outcomes(table, cases, world, config, known))
    return result


# --- the streaming side ---------------------------------------------------------------------

def stream_outcomes(messages: Sequence[Case], config: Optional[RecsConfig] = None
                    ) -> List[Outcome]:
    """Every message through `models.streaming.parse_messages`, one call per table.

    Messages of a table go in one batch, as a bundle would; if the call
    raises, each message is parsed alone to find the ones that make it raise.
    """
    from models import streaming

    limits = (config or RecsConfig()).inputs
    outcomes: List[Optional[Outcome]] = [None] * len(messages)
    for table in ("events", "treatment_events"):
        index = [i for i, m in enumerate(messages) if m.table == table]
        payloads = [messages[i].raw for i in index]
        attributes = [messages[i].attributes for i in index]
        try:
            parsed = streaming.parse_messages(table, payloads, attributes, limits)
            results = [(parsed, list(range(len(index))))]
        except Exception:  # noqa: BLE001
            results = []
            for k in range(len(index)):
                try:
                    results.append((streaming.parse_messages(
                        table, [payloads[k]], [attributes[k]], limits), [k]))
                except Exception as err:  # noqa: BLE001
                    outcomes[index[k]] = Outcome(CRASH, f"{type(err).__name__}: {err}"[:200])
        for parsed, positions in results:
            for p, reason in parsed.bad:
                outcomes[index[positions[p]]] = Outcome(DEAD, reason)
            refused = {p for p, _ in parsed.bad}
            for p in range(len(positions)):
                if p not in refused:
                    outcomes[index[positions[p]]] = Outcome(ACCEPT)
    return [o if o is not None else Outcome(LOST, "no outcome") for o in outcomes]


def parser_expect(message: Case) -> str:
    """What the parser alone must do: a reference-stage case passes it."""
    return "accept" if message.stage == "reference" else message.expect


def append_corpus(directory: str, tables: Sequence[str] = TABLES) -> Dict[str, int]:
    """Adds every table's case lines to ``<directory>/<table>.jsonl``; returns lines added.

    Lines are appended, except a line that starts with a byte-order mark: a BOM
    only ever starts a file, so that line goes first.
    """
    bom = "\ufeff".encode("utf-8")
    added = {}
    for table in tables:
        lines = [c.raw for c in load_cases(table)]
        path = os.path.join(directory, f"{table}.jsonl")
        with open(path, "rb") as handle:
            existing = handle.read()
        first = [line for line in lines if line.startswith(bom)][:1]
        rest = [line for line in lines if line not in first]
        with open(path, "wb") as handle:
            handle.write(b"".join(line + b"\n" for line in first) + existing.lstrip(bom))
            if existing and not existing.endswith(b"\n"):
                handle.write(b"\n")
            handle.write(b"".join(line + b"\n" for line in rest))
        added[table] = len(lines)
    return added


# --- the batch job on the world plus the corpus ----------------------------------------------

# Characters that must never reach a published value: C0/C1 controls, DEL, lone
# surrogates, and the invisible format characters that make one identifier look like another.
_UNSAFE_CHARS = ("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u202a-\u202e\u2060-\u2064"
                 "\u2066-\u2069\ufeff]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATOM}(\.{_ATOM})*@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+"
_HTTPS = r"(?i:https)://[A-Za-z0-9.-]+(:[0-9]+)?/[^\s\"'<>`]*"


@dataclass
class JobRun:
    """What one batch run left in its warehouse."""

    exit_code: int
    status: str
    counters: Dict[str, int]
    dead_letters: pd.DataFrame      # table, step, reason, record
    recommendations: pd.DataFrame


def run_batch_job(input_dir: str, warehouse: str, as_of: str) -> JobRun:
    """Runs the batch job as a user would and reads back what it recorded."""
    import duckdb

    from pipelines import batch_recommendations

    code = batch_recommendations.run(["--input_dir", input_dir, "--warehouse", warehouse,
                                      "--as_of", as_of])
    with duckdb.connect(warehouse, read_only=True) as con:
        status, counters = con.execute("SELECT status, counters FROM pipeline_runs").fetchone()
        dead = con.execute('SELECT "table", step, reason, record FROM dead_letter').df()
        recs = con.execute("SELECT * FROM recommendations").df()
    return JobRun(code, status, json.loads(counters), dead, recs)


def match_dead_letters(cases: Sequence[Case], dead: pd.DataFrame) -> Dict[int, Outcome]:
    """Pairs each expected-dead case with a dead letter of its table that has a fitting reason.

    A line refused while parsing or validating is stored as its raw text (cut
    at 10,000 characters), so it is found by its text; a row refused later
    (unknown SKU, a lost catalogue conflict) is stored re-serialised, so it is
    found by reason among the dead letters not yet paired.
    Returns the paired cases' outcomes, by index in ``cases``.
    """
    from collections import defaultdict

    free = defaultdict(list)
    for row in dead.itertuples(index=False):
        free[row.table].append(row)
    out: Dict[int, Outcome] = {}

    def take(i: int, case: Case, by_text: bool) -> None:
        text = case.raw.decode("utf-8", errors="backslashreplace").lstrip("\ufeff")[:200]
        pool = free[case.table]
        for k, row in enumerate(pool):
            same = isinstance(row.record, str) and row.record.startswith(text)
            if (same if by_text else row.step not in ("Parse", "Validate")) and \
                    reason_matches(case.expect, row.reason):
                out[i] = Outcome(DEAD, row.reason)
                pool.pop(k)
                return

    wanted = [(i, c) for i, c in enumerate(cases) if expected_kind(c.expect) == DEAD]
    for i, case in wanted:
        take(i, case, by_text=True)
    for i, case in wanted:
        if i not in out:
            take(i, case, by_text=False)
    return out


def unsafe_published_values(recs: pd.DataFrame, rec_columns: int = 4) -> List[str]:
    """Published values no contract should have let through, one line each."""
    import re

    unsafe, addr, https = re.compile(_UNSAFE_CHARS), re.compile(_ADDR), re.compile(_HTTPS)
    problems = []
    for column in recs.columns:
        for value in recs[column]:
            if isinstance(value, str) and unsafe.search(value):
                problems.append(f"{column}: unsafe character in {value!r}"[:200])
    ids = ["user_id"] + [f"rec_part_{k}" for k in range(1, rec_columns + 1)]
    for column in ids:
        for value in recs[column].dropna():
            if value != value.strip() or not value:
                problems.append(f"{column}: padded or empty {value!r}")
    for value in recs["email_lower"]:
        if not (isinstance(value, str) and len(value) <= 254 and addr.fullmatch(value)):
            problems.append(f"email_lower: not an addr-spec {value!r}"[:200])
    for k in range(1, rec_columns + 1):
        for value in recs[f"rec{k}_image_url"].dropna():
            if not https.fullmatch(value):
                problems.append(f"rec{k}_image_url: unsafe URL {value!r}"[:200])
    return problems


def stream_reference_outcomes(messages: Sequence[Case], parsed: Sequence[Outcome],
                              known_skus, config: Optional[RecsConfig] = None
                              ) -> List[Outcome]:
    """The streaming job's checks after the parse, in message order (as the stream sees them).

    Events whose SKU the reference catalogue lacks are refused (`CheckSkus`); a
    treatment event goes through `models.streaming.funnel_step` against what
    its recipient's earlier messages established (`CheckFunnel`'s state), so a
    click without a send is refused and a stage reached twice is a duplicate.
    """
    from models import streaming

    limits = (config or RecsConfig()).inputs
    memory: Dict[tuple, object] = {}
    out = []
    for message, outcome in zip(messages, parsed):
        if outcome.kind != ACCEPT:
            out.append(outcome)
            continue
        record = streaming.parse_messages(message.table, [message.raw], [message.attributes],
                                          limits).records[0]
        if message.table == "events":
            out.append(Outcome(ACCEPT) if record["sku"] in known_skus
                       else Outcome(DEAD, streaming.UNKNOWN_SKU_REASON))
            continue
        key = tuple(record[k] for k in streaming.RECIPIENT_KEY)
        verdict = streaming.funnel_step(memory.get(key), record["kind"],
                                        int(record["event_time_us"]))
        if verdict.refusal is not None:
            out.append(Outcome(DEAD, verdict.refusal))
            continue
        memory[key] = verdict.memory
        out.append(Outcome(DEDUP) if verdict.repeat else Outcome(ACCEPT))
    return out


def reference_skus(world: World) -> set:
    """The SKUs of the streaming job's reference catalogue (the world's, conflicts resolved)."""
    return set(catalog.resolve_conflicts(world.catalog).catalog["sku"])
