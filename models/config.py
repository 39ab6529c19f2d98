"""The one typed place for rules, windows and weights, with SPEC §3 defaults.

Every job builds a :class:`RecsConfig`; its checks run at construction so a bad
value fails at start-up with a message, never halfway through a run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Tuple

GLOBAL_LEVEL = "global"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid configuration: {message}")


def _finite(owner, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                 and math.isfinite(value), f"{name} must be a finite number, got {value!r}")


def _whole(owner, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        _require(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer, got {value!r}")


@dataclass(frozen=True)
class ScoringConfig:
    """How popularity, intent and specificity combine into one score.

    Attributes:
      half_life_days: an order's weight halves every this many days (SPEC: 30).
      popularity_scale: the blended order share is multiplied by this before
        ``log1p``, so the score reads as log(1 + orders per `scale` orders).
      shrinkage_orders: pseudo-orders a segment borrows from its parent level;
        a segment with far more real orders than this stands on its own.
      intent_window_days: views and cart updates older than this are ignored.
      cart_weight / view_weight: score added for a SKU the user carted / viewed
        (cart > view, SPEC §3).
      specific_bonus: score added for a part that fits the vehicle specifically,
        so it ranks above a universal part of similar popularity.
    """

    half_life_days: float = 30.0
    popularity_scale: float = 10_000.0
    shrinkage_orders: float = 20.0
    intent_window_days: int = 93
    cart_weight: float = 1.0
    view_weight: float = 0.5
    specific_bonus: float = 0.25

    def __post_init__(self) -> None:
        _whole(self, "intent_window_days")
        _require(self.half_life_days > 0, "half_life_days must be > 0")
        _require(self.popularity_scale > 0, "popularity_scale must be > 0")
        _require(self.shrinkage_orders >= 0, "shrinkage_orders must be >= 0")
        _require(self.intent_window_days >= 0, "intent_window_days must be >= 0")
        _require(self.cart_weight >= self.view_weight >= 0,
                 "need cart_weight >= view_weight >= 0 (cart update outranks a view)")
        _require(self.specific_bonus >= 0, "specific_bonus must be >= 0")
        _finite(self, "half_life_days", "popularity_scale", "shrinkage_orders", "cart_weight",
                "view_weight", "specific_bonus")

    @property
    def max_score(self) -> float:
        """Upper end of the score formula's range (QA rule 11); a SKU gets one intent boost."""
        return (math.log1p(self.popularity_scale) + max(self.cart_weight, self.view_weight)
                + self.specific_bonus)


@dataclass(frozen=True)
class RulesConfig:
    """Eligibility and business rules of SPEC §3 (the QA checks use the same values).

    Attributes:
      min_price: rule 1, USD (raised from $20 in the field).
      recs_per_user: rule 2.
      max_per_part_type: rule 3.
      exclusion_days: rule 4, nothing bought in this many days is recommended.
      excluded_tags: rule 5, catalogue tags that make a SKU ineligible.
      service_sku_patterns: rule 6, ``fnmatch`` patterns of service SKUs.
      low_value_keywords / low_value_exceptions: part types containing a keyword
        are excluded unless listed (lower-case) as an exception.
    """

    min_price: float = 50.0
    recs_per_user: int = 4
    max_per_part_type: int = 2
    exclusion_days: int = 365
    excluded_tags: Tuple[str, ...] = ("refurbished",)
    service_sku_patterns: Tuple[str, ...] = ("SVC-*", "SERVICE-*", "INSTALL-*", "WARRANTY-*")
    low_value_keywords: Tuple[str, ...] = (
        "gasket", "bolt", "decal", "clamp", "sticker", "washer", "o-ring", "grommet",
        "cap", "clip")
    low_value_exceptions: Tuple[str, ...] = ("engine bolt kit", "distributor cap")

    def __post_init__(self) -> None:
        _whole(self, "recs_per_user", "max_per_part_type", "exclusion_days")
        _require(self.min_price >= 0, "min_price must be >= 0")
        _finite(self, "min_price")
        _require(self.recs_per_user >= 1, "recs_per_user must be >= 1")
        _require(self.max_per_part_type >= 1, "max_per_part_type must be >= 1")
        _require(self.exclusion_days >= 0, "exclusion_days must be >= 0")
        for name in ("excluded_tags", "service_sku_patterns", "low_value_keywords",
                     "low_value_exceptions"):
            value = getattr(self, name)
            _require(isinstance(value, tuple) and all(isinstance(v, str) for v in value),
                     f"{name} must be a tuple of strings")


@dataclass(frozen=True)
class RecsConfig:
    """Everything a recommendations run needs besides its inputs.

    ``segment_attributes`` lists user attributes from the coarsest to the finest;
    each prefix is one segment level, so the default gives the levels
    make+model+year → make+model → make → global, most specific first.
    ``fitment_attributes`` name the user's vehicle in the fitment table; they
    restrict candidates whatever levels score them (empty: no fitment).
    """

    segment_attributes: Tuple[str, ...] = ("make", "model", "year")
    fitment_attributes: Tuple[str, ...] = ("make", "model", "year")
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)

    def __post_init__(self) -> None:
        attrs = self.segment_attributes
        _require(isinstance(attrs, tuple) and all(isinstance(a, str) and a for a in attrs),
                 "segment_attributes must be a tuple of attribute names")
        _require(len(set(attrs)) == len(attrs), "segment_attributes has a repeated name")
        fit = self.fitment_attributes
        _require(isinstance(fit, tuple) and all(isinstance(a, str) and a for a in fit),
                 "fitment_attributes must be a tuple of attribute names")

    @property
    def group_attributes(self) -> Tuple[str, ...]:
        """Attributes that make two users interchangeable for scoring: segment and vehicle."""
        return tuple(dict.fromkeys(self.segment_attributes + self.fitment_attributes))

    @property
    def shard_attributes(self) -> Tuple[str, ...]:
        """Key that brings a user and the fitment rows of their vehicle together."""
        return self.fitment_attributes or self.group_attributes

    @property
    def levels(self) -> Tuple[Tuple[str, ...], ...]:
        """Segment levels, most specific first; the last is the empty global level."""
        attrs = self.segment_attributes
        return tuple(attrs[:n] for n in range(len(attrs), -1, -1))

    def level_name(self, level: Tuple[str, ...]) -> str:
        """Name written to the ``source`` column, e.g. ``make+model``."""
        return "+".join(level) if level else GLOBAL_LEVEL

    def replace(self, **changes) -> "RecsConfig":
        """A copy with top-level fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)


DEFAULT_CONFIG = RecsConfig()
