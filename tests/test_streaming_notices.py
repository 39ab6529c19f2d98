"""Ranking notices (issue #16): only changes a user would see, at most once per interval.

The rule (`models.ranking_notices`) is checked as pure functions, and the keyed
state and re-check timer of `PicksChangedFn` through a TestStream of vehicle
picks (no popularity, no reference data: a few seconds in all).
"""
import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from models import ranking_notices as rule
from models.config import RankingNoticesConfig
from models.config_file import ConfigError, config_from_dict
from tests.test_streaming_transforms import BASE, US, streaming_pipeline, summed
from transforms.health import Tag
from transforms.streaming.ranking import PicksChangedFn

HOUR = 3_600 * US
INTERVAL = 6 * HOUR
A = ("make", "S1", "S2", "S3", "S4")
B = ("make", "S1", "S2", "S3", "S5")
C = ("make", "S1", "S2", "S6", "S7")
REORDERED_A = ("global", "S4", "S3", "S2", "S1")     # A's products, another order and level


# --- the rule, as pure functions ------------------------------------------------------------------

def test_a_first_visible_change_is_notified_and_remembered():
    state, decision = rule.notice_decision(None, 1 * HOUR, B, A, 1, INTERVAL)
    assert decision == rule.NOTIFY
    assert state == rule.NoticeState(B, 1 * HOUR, 1 * HOUR, B)


def test_an_order_only_change_is_not_notified():
    """Same products in another order, or served by another fallback level: nothing to see."""
    assert rule.notice_decision(None, HOUR, REORDERED_A, A, 1, INTERVAL)[1] == rule.SAME
    state, _ = rule.notice_decision(None, HOUR, B, A, 1, INTERVAL)
    reordered_b = ("global", *B[1:][::-1])
    state, decision = rule.notice_decision(state, 2 * HOUR, reordered_b, B, 1, INTERVAL)
    assert decision == rule.SAME and state.told == B and state.latest == reordered_b


def test_a_flip_back_inside_the_interval_is_never_notified():
    state, _ = rule.notice_decision(None, 1 * HOUR, B, A, 1, INTERVAL)       # told B at 1 h
    state, decision = rule.notice_decision(state, 3 * HOUR, A, B, 1, INTERVAL)
    assert decision == rule.HOLD and state.told == B and state.latest == A
    state, decision = rule.notice_decision(state, 4 * HOUR, B, A, 1, INTERVAL)
    assert decision == rule.SAME                                            # back to what was told
    state, notify = rule.recheck(state, rule.recheck_at(state, INTERVAL), 1)
    assert not notify and state.told_at_us == 1 * HOUR


def test_a_change_lasting_past_the_interval_is_notified_once_at_its_end():
    state, _ = rule.notice_decision(None, 1 * HOUR, B, A, 1, INTERVAL)
    state, decision = rule.notice_decision(state, 2 * HOUR, C, B, 1, INTERVAL)
    assert decision == rule.HOLD
    state, decision = rule.notice_decision(state, 3 * HOUR, C, C, 1, INTERVAL)
    assert decision == rule.HOLD                  # still held: the interval has not passed
    due = rule.recheck_at(state, INTERVAL)
    assert due == 7 * HOUR
    state, notify = rule.recheck(state, due, 1)
    assert notify and state.told == C and state.told_at_us == 7 * HOUR
    state, notify = rule.recheck(state, due, 1)
    assert not notify                             # once
    # a window after the interval with a visible change is notified at once, without a hold
    state, decision = rule.notice_decision(state, 14 * HOUR, A, C, 1, INTERVAL)
    assert decision == rule.NOTIFY and state.told_at_us == 14 * HOUR


def test_min_changed_picks_counts_new_products():
    one_new, two_new = B, C                       # against A: S5 new; S6 and S7 new
    assert rule.notice_decision(None, HOUR, one_new, A, 2, INTERVAL)[1] == rule.SAME
    assert rule.notice_decision(None, HOUR, two_new, A, 2, INTERVAL)[1] == rule.NOTIFY
    assert rule.notice_decision(None, HOUR, one_new, A, 1, INTERVAL)[1] == rule.NOTIFY


def test_an_older_window_after_a_newer_one_changes_nothing():
    state, _ = rule.notice_decision(None, 5 * HOUR, B, A, 1, INTERVAL)
    same, decision = rule.notice_decision(state, 4 * HOUR, C, A, 1, INTERVAL)
    assert decision == rule.STALE and same == state


def test_no_throttle_with_a_zero_interval():
    state, _ = rule.notice_decision(None, 1 * US, B, A, 1, 0)
    assert rule.notice_decision(state, 2 * US, A, B, 1, 0)[1] == rule.NOTIFY


def test_the_recheck_is_on_a_whole_millisecond():
    """Portable runners keep timer timestamps in milliseconds: the re-check time is rounded up."""
    state = rule.NoticeState(B, 10 * US, 10 * US, C)
    assert rule.recheck_at(state, 10 * US + 500) == 20 * US + 1_000
    assert rule.recheck_at(state, 10 * US) == 20 * US


def test_the_section_is_configurable_and_validated():
    config = config_from_dict({"ranking_notices": {"min_changed_picks": 2,
                                                   "min_interval_hours": 0.5}})
    assert config.ranking_notices == RankingNoticesConfig(2, 0.5)
    assert rule.interval_us(config.ranking_notices) == HOUR // 2
    with pytest.raises(ConfigError, match="min_changed_picks"):
        config_from_dict({"ranking_notices": {"min_changed_picks": 0}})
    with pytest.raises(ConfigError, match="min_interval_hours"):
        config_from_dict({"ranking_notices": {"min_interval_hours": -1}})


# --- the keyed state and the re-check timer, through a TestStream --------------------------------

def _picks(vehicle, second, picks, earlier):
    end_us = (BASE + second) * US
    return TimestampedValue((vehicle, (end_us, picks, earlier)), BASE + second)


class _At(beam.DoFn):
    """A notice as (vehicle, seconds after BASE of its element time, of its payload)."""

    def process(self, notice, timestamp=beam.DoFn.TimestampParam):
        vehicle, at_us = notice
        yield vehicle, (timestamp.micros - BASE * US) / US, (at_us - BASE * US) / US


def test_picks_changed_holds_flips_and_sends_lasting_changes_when_the_interval_ends():
    """An interval of 10.0005 s: V1 flips and flips back inside it (one notice, the first);
    V2's change lasts and is sent once when the interval ends, at the timer's whole millisecond
    (10.001 s after its first notice); V3 only reorders (never); V4's change comes after the
    interval (sent at once)."""
    notices = RankingNoticesConfig(min_changed_picks=1, min_interval_hours=10.0005 / 3_600)
    stream = (TestStream()
              .advance_watermark_to(BASE)
              .add_elements([_picks("V1", 2, B, A), _picks("V2", 2, B, A),
                             _picks("V3", 2, REORDERED_A, A), _picks("V4", 2, B, A)])
              .advance_watermark_to(BASE + 3)
              .add_elements([_picks("V1", 4, A, B), _picks("V2", 4, C, B)])
              .advance_watermark_to(BASE + 5)
              .add_elements([_picks("V1", 6, B, A)])
              .advance_watermark_to(BASE + 14)
              .add_elements([_picks("V2", 14, C, C), _picks("V4", 14, C, B)])
              .advance_watermark_to(BASE + 100)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        out = (p | stream
               | beam.ParDo(PicksChangedFn(notices)).with_outputs(
                   Tag.COUNTS.value, main=Tag.ROWS.value))
        assert_that(out[Tag.ROWS.value] | beam.ParDo(_At()), equal_to([
            ("V1", 2, 2), ("V2", 2, 2), ("V4", 2, 2),
            ("V2", 12.001, 12.001),             # held at 4, still there when the interval ended
            ("V4", 14, 14),
        ]), label="Notices")
        assert_that(summed("Counts", out[Tag.COUNTS.value]), equal_to([{
            "ranking.notices_held": 2, "ranking.notices_after_hold": 1,
            "ranking.changes_not_visible": 2}]), label="Counts")
