"""The hand-written hostile corpus (issue #13): every case gets its expected verdict.

tests/hostile/ holds realistic and hostile lines for the five input tables and
Pub/Sub messages, each with the verdict a careful engineer expects (accept,
deduplicate, accept but never recommend, or dead-letter with a reason naming
the problem). The cases go through the batch job's parse, validation and
table checks, through the streaming parser and its Beam transform, and, as
files appended to the tiny world, through the whole batch job. A failure
lists every case whose outcome differs, with why the case is there;
bench/hostile.py turns the same outcomes into the figures of
docs/reliability.md.
"""
import json
import os
import re
import shutil
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_pipeline import TestPipeline

from models import contracts
from tests.hostile import harness as h
from transforms.streaming import ParseMessages

VERDICT = re.compile(r"^(accept|dedup|(dead|ineligible):[^:|&]+([|&][^:|&]+)*)$")


@pytest.fixture(scope="module")
def world(clean_world):
    return h.World.read(clean_world[0])


@pytest.fixture(scope="module")
def batch(world):
    return h.all_batch_outcomes(world)


@pytest.fixture(scope="module")
def messages():
    return h.load_messages()


# --- the corpus itself ------------------------------------------------------------------------

def test_the_corpus_is_large_varied_and_every_case_has_a_verdict_and_a_reason(messages):
    cases = [c for t in h.TABLES for c in h.load_cases(t)]
    assert len(cases) >= 300 and len(messages) >= 50
    for case in cases + messages:
        assert VERDICT.match(case.expect), (case.label, case.expect)
        assert case.why.strip(), case.label
    per_table = Counter(c.table for c in cases)
    assert all(per_table[t] >= 40 for t in h.TABLES), per_table
    kinds = Counter(h.expected_kind(c.expect) for c in cases + messages)
    # Good records matter as much as bad ones: wrongly refusing them is counted too.
    assert kinds["accept"] >= 80 and kinds["dead"] >= 200, kinds
    assert {m.table for m in messages} == {"events", "treatment_events"}
    assert max(len(m.raw) for m in messages) > 9_000_000   # near Pub/Sub's 10 MB limit


def test_the_judge_counts_each_kind_of_failure():
    """The scoring can fail: wrong kinds, wrong or empty reasons each land in their figure."""
    dead, accept, inel = "dead:email|e-mail", "accept", "ineligible:https"
    assert h.judge(dead, h.Outcome(h.DEAD, "malformed email")) == "dead_lettered_as_expected"
    assert h.judge(dead, h.Outcome(h.DEAD, "missing user_id")) == "dead_lettered_other_reason"
    assert h.judge(dead, h.Outcome(h.DEAD, "")) == "dead_lettered_other_reason"
    assert h.judge(dead, h.Outcome(h.ACCEPT)) == "wrongly_accepted"
    assert h.judge(dead, h.Outcome(h.INELIGIBLE, "image URL not https")) == "wrongly_accepted"
    assert h.judge(accept, h.Outcome(h.DEAD, "malformed JSON")) == "wrongly_refused"
    assert h.judge(accept, h.Outcome(h.DEDUP)) == "wrongly_refused"
    assert h.judge(inel, h.Outcome(h.ACCEPT)) == "wrongly_accepted"
    assert h.judge(inel, h.Outcome(h.INELIGIBLE, "image URL not https")) == "accepted"
    assert h.judge(accept, h.Outcome(h.CRASH, "KeyError")) == "crashed"
    assert h.judge(accept, h.Outcome(h.LOST)) == "lost"
    assert h.reason_matches("dead:control&sku", "control character in sku")
    assert not h.reason_matches("dead:control&sku", "control character in user_id")


# --- batch: parse, validate, table checks ---------------------------------------------------------

@pytest.mark.parametrize("table", h.TABLES)
def test_every_input_case_gets_its_verdict_in_the_batch_checks(batch, table):
    cases, outcomes = batch[table]
    assert len(outcomes) == len(cases)
    wrong = h.mismatches(cases, outcomes)
    assert not wrong, f"{len(wrong)} of {len(cases)} {table} cases:\n" + "\n".join(wrong)


# --- streaming: the parser and its Beam transform -------------------------------------------------

def _parser_cases(messages):
    return [c if c.stage == "parse" else h.Case(c.table, c.number, c.raw, "accept", c.why,
                                                  c.attributes) for c in messages]


def test_every_message_gets_its_verdict_in_the_streaming_parser(messages):
    outcomes = h.stream_outcomes(messages)
    wrong = h.mismatches(_parser_cases(messages), outcomes)
    assert not wrong, f"{len(wrong)} of {len(messages)} messages:\n" + "\n".join(wrong)


def test_every_message_gets_its_verdict_after_the_streaming_reference_checks(messages, world):
    """Unknown SKUs and clicks without a send are refused in streaming as in batch (issue #13)."""
    parsed = h.stream_outcomes(messages)
    outcomes = h.stream_reference_outcomes(messages, parsed, h.reference_skus(world))
    wrong = h.mismatches(messages, outcomes)
    assert not wrong, f"{len(wrong)} of {len(messages)} messages:\n" + "\n".join(wrong)


_SINK = {}


class _Keep(beam.DoFn):
    def __init__(self, key):
        self._key = key

    def process(self, element):
        _SINK.setdefault(self._key, []).append(element)


def _beam_outcomes(cases, rows, dead):
    """Each case's outcome from a pipeline's rows and dead letters.

    A dead letter of the parse holds the payload's text, one of a later check
    the record re-serialised (found by event id); a row is found by event id.
    """
    free = list(dead)
    accepted = Counter(r["event_id"] for r in rows)
    outcomes = []
    for case in cases:
        text = case.raw.decode("utf-8", errors="replace")[:100]
        try:
            event_id = json.loads(case.raw.decode("utf-8").lstrip("\ufeff")).get("event_id")
        except (ValueError, AttributeError):
            event_id = None

        def found(d):
            if d["step"] == "ParseMessages":
                return d["record"][:100] == text
            return event_id is not None and json.loads(d["record"]).get("event_id") == event_id

        hit = next((d for d in free if found(d) and h.reason_matches(case.expect, d["reason"])),
                   None) or next((d for d in free if found(d)), None)
        if hit is not None:
            free.remove(hit)
            outcomes.append(h.Outcome(h.DEAD, hit["reason"]))
        elif event_id is not None and accepted[event_id] > 0:
            accepted[event_id] -= 1
            outcomes.append(h.Outcome(h.ACCEPT))
        else:
            outcomes.append(h.Outcome(h.LOST, "neither a row nor a dead letter"))
    return outcomes


@pytest.mark.parametrize("table", ["events", "treatment_events"])
def test_the_beam_transforms_give_each_message_its_verdict(messages, clean_world, table):
    """ParseMessages (then CheckSkus for events) in a pipeline: a record or a dead letter each."""
    from models.config import DEFAULT_CONFIG
    from transforms.streaming import CheckSkus, FileReference

    mine = [m for m in messages if m.table == table]
    _SINK.clear()
    with TestPipeline() as p:
        parsed = (p | beam.Create([PubsubMessage(m.raw, m.attributes) for m in mine],
                                  reshuffle=False)
                  | ParseMessages(table))
        rows, dead = parsed.rows, [parsed.dead_letters]
        if table == "events":
            checked = rows | CheckSkus(table, FileReference(clean_world[0], DEFAULT_CONFIG, 600))
            rows, dead = checked.rows, dead + [checked.dead_letters]
        _ = rows | "KeepRows" >> beam.ParDo(_Keep("rows"))
        _ = tuple(dead) | "AllDead" >> beam.Flatten() | "KeepDead" >> beam.ParDo(_Keep("dead"))
    rows, dead = _SINK.get("rows", []), _SINK.get("dead", [])
    assert len(rows) + len(dead) == len(mine)
    assert all(isinstance(d["reason"], str) and d["reason"] for d in dead)
    # The funnel needs its state in arrival order (a streaming pipeline); the pure check covers it.
    expected = mine if table == "events" else _parser_cases(mine)
    outcomes = _beam_outcomes(expected, rows, dead)
    wrong = h.mismatches(expected, outcomes)
    assert not wrong, f"{len(wrong)} of {len(mine)} {table} messages:\n" + "\n".join(wrong)


# --- the whole batch job on the world plus the corpus ---------------------------------------------

@pytest.fixture(scope="module")
def job_runs(clean_world, tmp_path_factory):
    """The batch job on the clean world, then on the same world with the corpus added."""
    source, manifest = clean_world
    runs = {}
    for name in ("clean", "hostile"):
        directory = str(tmp_path_factory.mktemp(name))
        for table in h.TABLES:
            shutil.copy(os.path.join(source, f"{table}.jsonl"), directory)
        added = h.append_corpus(directory) if name == "hostile" else {}
        run = h.run_batch_job(directory, os.path.join(directory, "warehouse.duckdb"),
                              manifest["as_of"])
        runs[name] = (run, added)
    return runs


def test_the_batch_job_publishes_with_the_corpus_and_every_line_is_accounted_for(job_runs):
    from models.health import RECONCILED_TABLES, reconcile

    (clean, _), (hostile, added) = job_runs["clean"], job_runs["hostile"]
    assert clean.exit_code == 0 and hostile.exit_code == 0, hostile.status
    assert hostile.status == "published"
    before, after = reconcile(clean.counters), reconcile(hostile.counters)
    for table in RECONCILED_TABLES:
        assert after[table]["unexplained"] == 0, (table, after[table])
        assert after[table]["read"] - before[table]["read"] == added[table], table
    # Every dead letter says why.
    reasons = hostile.dead_letters["reason"]
    assert reasons.map(lambda r: isinstance(r, str) and r.strip() != "").all()


@pytest.mark.parametrize("table", ["catalog", "fitment", "users", "events"])
def test_the_batch_job_dead_letters_each_expected_case_with_its_reason(job_runs, table):
    """Per table: the corpus adds exactly the expected dead letters, each with its reason."""
    (clean, _), (hostile, _) = job_runs["clean"], job_runs["hostile"]
    cases = h.load_cases(table)
    paired = h.match_dead_letters(cases, hostile.dead_letters)
    want = [i for i, c in enumerate(cases) if h.expected_kind(c.expect) == h.DEAD]
    missing = [f"{cases[i].label}: {cases[i].expect} ({cases[i].why})" for i in want
               if i not in paired]
    added = (hostile.dead_letters["table"] == table).sum() - (
        clean.dead_letters["table"] == table).sum()
    assert not missing and added == len(want), (
        f"{added} dead letters added for {len(want)} expected; not found:\n" + "\n".join(missing))


def test_no_refused_value_reaches_the_published_recommendations(job_runs, world):
    """No control character, padded SKU, bad e-mail, unsafe URL or refused user is published."""
    (hostile, _) = job_runs["hostile"]
    recs = hostile.recommendations
    assert len(recs) > 0
    problems = h.unsafe_published_values(recs)
    assert not problems, "\n".join(problems[:40])

    def ids(table, field, kind):
        out = set()
        for case in h.load_cases(table):
            if h.expected_kind(case.expect) == kind:
                record, _ = contracts.parse_json_line(case.raw.lstrip(b"\xef\xbb\xbf"))
                if record and isinstance(record.get(field), str):
                    out.add(record[field])
        return out

    kept_users = set(world.users["user_id"]) | ids("users", "user_id", h.ACCEPT)
    refused_users = ids("users", "user_id", h.DEAD) - kept_users
    assert refused_users and not refused_users & set(recs["user_id"])
    good_skus = set(world.catalog["sku"]) | ids("catalog", "sku", h.ACCEPT)
    recommended = set(recs[[f"rec_part_{k}" for k in range(1, 5)]].stack())
    assert recommended <= good_skus, sorted(recommended - good_skus)[:20]
