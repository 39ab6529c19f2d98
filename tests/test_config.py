"""Tests for models.config: validation at construction, segment levels, the score bound."""
import dataclasses
import math

import pytest

from models.config import GLOBAL_LEVEL, RecsConfig, RulesConfig, ScoringConfig

INF = float("inf")
NAN = float("nan")


# --- defaults are the SPEC §3 values ------------------------------------------

def test_scoring_defaults_match_spec():
    s = ScoringConfig()
    assert s.half_life_days == 30.0
    assert s.intent_window_days == 93
    assert s.cart_weight > s.view_weight > 0  # cart update > product view


def test_rules_defaults_match_spec():
    r = RulesConfig()
    assert (r.min_price, r.recs_per_user, r.max_per_part_type, r.exclusion_days) == (
        50.0, 4, 2, 365)
    assert "refurbished" in r.excluded_tags
    assert "engine bolt kit" in r.low_value_exceptions
    assert "distributor cap" in r.low_value_exceptions


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RecsConfig().rules.min_price = 10.0  # type: ignore[misc]


# --- invalid values fail at construction with a clear message ------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"half_life_days": 0.0}, "half_life_days must be > 0"),
    ({"half_life_days": -1.0}, "half_life_days must be > 0"),
    ({"half_life_days": NAN}, "half_life_days must be > 0"),
    ({"popularity_scale": 0.0}, "popularity_scale must be > 0"),
    ({"shrinkage_orders": -0.5}, "shrinkage_orders must be >= 0"),
    ({"intent_window_days": -1}, "intent_window_days must be >= 0"),
    ({"cart_weight": 0.2, "view_weight": 0.5}, "cart_weight >= view_weight"),
    ({"view_weight": -0.1, "cart_weight": 1.0}, "cart_weight >= view_weight >= 0"),
    ({"cart_weight": NAN}, "cart_weight >= view_weight"),
    ({"specific_bonus": -0.01}, "specific_bonus must be >= 0"),
])
def test_scoring_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match="invalid configuration: .*" + message):
        ScoringConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_price": -1.0}, "min_price must be >= 0"),
    ({"min_price": NAN}, "min_price must be >= 0"),
    ({"recs_per_user": 0}, "recs_per_user must be >= 1"),
    ({"max_per_part_type": 0}, "max_per_part_type must be >= 1"),
    ({"exclusion_days": -1}, "exclusion_days must be >= 0"),
    ({"excluded_tags": ["refurbished"]}, "excluded_tags must be a tuple of strings"),
    ({"service_sku_patterns": ("SVC-*", 3)}, "service_sku_patterns must be a tuple of strings"),
    ({"low_value_keywords": "gasket"}, "low_value_keywords must be a tuple of strings"),
    ({"low_value_exceptions": (None,)}, "low_value_exceptions must be a tuple of strings"),
])
def test_rules_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match="invalid configuration: " + message):
        RulesConfig(**kwargs)


@pytest.mark.parametrize("attrs, message", [
    (("make", "make"), "repeated name"),
    (("make", ""), "segment_attributes must be a tuple of attribute names"),
    (["make", "model"], "segment_attributes must be a tuple of attribute names"),
    (("make", 3), "segment_attributes must be a tuple of attribute names"),
])
def test_recs_config_rejects_bad_segment_attributes(attrs, message):
    with pytest.raises(ValueError, match=message):
        RecsConfig(segment_attributes=attrs)


def test_replace_validates_again():
    config = RecsConfig()
    with pytest.raises(ValueError, match="repeated name"):
        config.replace(segment_attributes=("make", "model", "make"))
    changed = config.replace(rules=RulesConfig(min_price=20.0))
    assert changed.rules.min_price == 20.0
    assert config.rules.min_price == 50.0  # the original is untouched


@pytest.mark.parametrize("name", ["popularity_scale", "shrinkage_orders", "cart_weight",
                                  "specific_bonus"])
def test_scoring_rejects_non_finite_weights(name):
    with pytest.raises(ValueError, match=name):
        ScoringConfig(**{name: INF})


@pytest.mark.parametrize("kwargs", [{"recs_per_user": 2.5}, {"max_per_part_type": 1.5},
                                    {"recs_per_user": True}])
def test_rules_rejects_non_integer_counts(kwargs):
    with pytest.raises(ValueError, match="integer"):
        RulesConfig(**kwargs)


# --- levels --------------------------------------------------------------------

def test_levels_most_specific_first_and_global_last():
    config = RecsConfig()
    assert config.levels == (("make", "model", "year"), ("make", "model"), ("make",), ())
    names = [config.level_name(level) for level in config.levels]
    assert names == ["make+model+year", "make+model", "make", GLOBAL_LEVEL]


def test_levels_follow_custom_attributes():
    config = RecsConfig(segment_attributes=("make", "model"))
    assert config.levels == (("make", "model"), ("make",), ())
    assert RecsConfig(segment_attributes=()).levels == ((),)


# --- max_score -----------------------------------------------------------------

def test_max_score_bounds_the_best_possible_score():
    s = ScoringConfig()
    # best case: a part with all of the segment's orders, carted and vehicle-specific
    best = math.log1p(1.0 * s.popularity_scale) + max(s.cart_weight, s.view_weight) + (
        s.specific_bonus)
    assert s.max_score == pytest.approx(best)  # tight: one intent boost per SKU


def test_max_score_moves_with_weights():
    low, high = ScoringConfig(popularity_scale=100.0), ScoringConfig(popularity_scale=1e6)
    assert high.max_score - low.max_score == pytest.approx(math.log1p(1e6) - math.log1p(100.0))
    assert ScoringConfig(specific_bonus=2.0).max_score == pytest.approx(
        ScoringConfig().max_score + 1.75)
