"""The one typed place for rules, windows and weights, with SPEC §3 defaults.

Every job builds a :class:`RecsConfig`; its checks run at construction so a bad
value fails at start-up with a message, never halfway through a run.
"""
from __future__ import annotations

import dataclasses
import math
import re
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
class InputConfig:
    """What a plausible input record is (SPEC §2); records outside it are dead-lettered.

    Attributes:
      min_vehicle_year / max_vehicle_year: a user's or fitment row's vehicle year
        outside this range is a typo (0, 1, 69), not a car.
      max_quantity: an order line above this many units is a typo or an attack;
        a wholesaler whose real lines are larger raises it.
      max_price: a unit price above this (USD) is refused likewise.
      treatment_ids: the registry of known e-mail treatments (issue #18): a
        treatment event naming any other id is dead-lettered (``unknown
        treatment_id``) and never becomes a bandit arm. Empty (the default,
        so any retailer's data runs unconfigured) accepts every id that
        matches ``treatment_id_pattern``.
      treatment_id_pattern: the form every treatment id must have, registry or
        not (a full match): letters, digits, ``_ . : -`` and single spaces
        between them (a campaign type such as ``Type A``), at most 64
        characters, so markup such as ``<script>`` never reaches a report.
    """

    min_vehicle_year: int = 1900
    max_vehicle_year: int = 2100
    max_quantity: int = 10_000
    max_price: float = 1_000_000.0
    treatment_ids: Tuple[str, ...] = ()
    treatment_id_pattern: str = r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]| (?=[A-Za-z0-9_.:-])){0,63}"

    def __post_init__(self) -> None:
        _whole(self, "min_vehicle_year", "max_vehicle_year", "max_quantity")
        _finite(self, "max_price")
        _require(0 < self.min_vehicle_year <= self.max_vehicle_year,
                 "need 0 < min_vehicle_year <= max_vehicle_year")
        _require(self.max_quantity >= 1, "max_quantity must be >= 1")
        _require(self.max_price > 0, "max_price must be > 0")
        _require(isinstance(self.treatment_ids, tuple)
                 and all(isinstance(t, str) for t in self.treatment_ids),
                 "treatment_ids must be a tuple of strings")
        _require(isinstance(self.treatment_id_pattern, str) and self.treatment_id_pattern,
                 "treatment_id_pattern must be a non-empty regular expression")
        try:
            pattern = re.compile(self.treatment_id_pattern)
        except re.error as err:
            raise ValueError(f"invalid configuration: treatment_id_pattern: {err}") from None
        bad = [t for t in self.treatment_ids if not pattern.fullmatch(t)]
        _require(not bad, f"treatment_ids {bad[:3]} do not match treatment_id_pattern")


@dataclass(frozen=True)
class GatesConfig:
    """Sanity gates (SPEC §10): a run that would e-mail nonsense is gated even when every
    QA rule holds. Each gate is a named row of ``qa_checks``; set a threshold to its
    permissive end (0 or 1) to switch that gate off.

    Attributes:
      max_history_age_days: the newest order may be at most this many days older
        than the run's ``--as_of``; older history decays every score to nothing.
      max_tied_user_share: at most this share of users may get a list whose
        scores all tie (an order that says nothing).
      max_sku_user_share: no single SKU may go to more than this share of users.
        Measured (#13): the demo world's top SKU reaches 21% of users, the tiny
        1,500-user test world's universal car cover 85%, the failure this gate is
        for (another shop's postage SKU) 100%; a grocer's milk reaches every
        household and sets 1.0 in its own config.
      min_eligible_skus / min_eligible_share: the catalogue left after the rules
        must hold at least this many SKUs and this share of the catalogue; the
        rules of another shop can leave a handful of products (or postage).
      min_input_ratio: each input table must hold at least this share of the rows
        the last published run read.
      max_changed_user_share: at most this share of the users common with the last
        published output may see a changed list (the field: 16.24% a day), unless
        the run is started with ``--accept_changes``.
    """

    max_history_age_days: float = 30.0
    max_tied_user_share: float = 0.5
    max_sku_user_share: float = 0.9
    min_eligible_skus: int = 20
    min_eligible_share: float = 0.01
    min_input_ratio: float = 0.5
    max_changed_user_share: float = 0.5

    def __post_init__(self) -> None:
        _whole(self, "min_eligible_skus")
        _finite(self, "max_history_age_days", "max_tied_user_share", "max_sku_user_share",
                "min_eligible_share", "min_input_ratio", "max_changed_user_share")
        _require(self.max_history_age_days > 0, "max_history_age_days must be > 0")
        _require(self.min_eligible_skus >= 0, "min_eligible_skus must be >= 0")
        for name in ("max_tied_user_share", "max_sku_user_share", "min_eligible_share",
                     "min_input_ratio", "max_changed_user_share"):
            _require(0 <= getattr(self, name) <= 1, f"{name} must be within [0, 1]")


SOURCES = ("segment_popularity", "buy_again", "also_bought", "trending")
# Sources that re-offer what the user bought: exempt from rule 4 (SPEC exclusion) by design.
REPURCHASE_SOURCES = ("buy_again",)
BOOSTABLE_SOURCES = ("segment_popularity", "also_bought")
SIMILARITY_MEASURES = ("count", "jaccard", "lift", "cosine")


@dataclass(frozen=True)
class BuyAgainConfig:
    """The buy-again source (models.candidates.buy_again).

    Attributes:
      half_life_days: a past purchase's weight halves every this many days
        (the grocer measured 365 better than 30, docs/recommenders.md).
      due: scale by how due the item is against its typical repurchase interval.
      max_due: cap of the due factor (1: a due item keeps its whole frequency).
    """

    half_life_days: float = 30.0
    due: bool = True
    max_due: float = 1.0

    def __post_init__(self) -> None:
        _finite(self, "half_life_days", "max_due")
        _require(self.half_life_days > 0, "half_life_days must be > 0")
        _require(self.max_due > 0, "max_due must be > 0")
        _require(isinstance(self.due, bool), "due must be true or false")


@dataclass(frozen=True)
class AlsoBoughtConfig:
    """The also-bought source (models.candidates.item_similarity / also_bought_scores).

    Attributes:
      similarity: count, jaccard, lift or cosine (SAR's measures).
      top_n: neighbours kept per item.
      max_history: most recent distinct SKUs per user that emit pairs (bounds the
        pairs at users × max_history²) and carry affinity.
      min_cooccurrence: pairs seen together fewer times are dropped.
      half_life_days: decay of a user's affinity to what they bought.
      cart_weight: affinity a SKU in the user's cart (the intent window's ``carted``)
        adds, beside the decayed purchases (0: carts are ignored).
      max_carts: carted SKUs per user that carry affinity (bounds the cart rows).
    """

    similarity: str = "jaccard"
    top_n: int = 50
    max_history: int = 100
    min_cooccurrence: int = 1
    half_life_days: float = 30.0
    cart_weight: float = 1.0
    max_carts: int = 20

    def __post_init__(self) -> None:
        _whole(self, "top_n", "max_history", "min_cooccurrence")
        _finite(self, "half_life_days")
        _require(self.similarity in SIMILARITY_MEASURES,
                 f"similarity must be one of {', '.join(SIMILARITY_MEASURES)}, "
                 f"got {self.similarity!r}")
        _require(self.top_n >= 1, "top_n must be >= 1")
        _require(self.max_history >= 2, "max_history must be >= 2")
        _require(self.min_cooccurrence >= 1, "min_cooccurrence must be >= 1")
        _require(self.half_life_days > 0, "half_life_days must be > 0")
        _whole(self, "max_carts")
        _finite(self, "cart_weight")
        _require(self.cart_weight >= 0, "cart_weight must be >= 0")
        _require(self.max_carts >= 0, "max_carts must be >= 0")


@dataclass(frozen=True)
class TrendingConfig:
    """The trending source (models.candidates.trending), the origin's +20% for >= 50% growth.

    Attributes:
      period_days: recent period P, compared with the P days before it.
      min_count: orders in the recent period a SKU needs to trend.
      growth: growth of decayed orders at or above which a SKU trends (0.5 = +50%).
      boost: the trending multiplier minus one (0.2 = +20%).
      boost_sources: discovery sources whose scores are multiplied by (1 + boost)
        for trending SKUs (segment_popularity, also_bought); empty: no boost.
    """

    period_days: float = 28.0
    min_count: int = 5
    growth: float = 0.5
    boost: float = 0.2
    boost_sources: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _whole(self, "min_count")
        _finite(self, "period_days", "growth", "boost")
        _require(self.period_days > 0, "period_days must be > 0")
        _require(self.min_count >= 1, "min_count must be >= 1")
        _require(self.boost >= 0, "boost must be >= 0")
        _require(isinstance(self.boost_sources, (tuple, list)),
                 "boost_sources must be a list of source names")
        for name in self.boost_sources:
            _require(name in BOOSTABLE_SOURCES, f"boost_sources names {name!r}; trending boosts "
                     f"discovery sources only: {', '.join(BOOSTABLE_SOURCES)}")
        object.__setattr__(self, "boost_sources", tuple(self.boost_sources))


@dataclass(frozen=True)
class CandidatesConfig:
    """Which candidate sources fill a user's slots, in order, and their settings (#14).

    Attributes:
      mix: ordered ``[source, slots]`` pairs; a source that runs dry leaves its
        slots to the next one (models.mix.fill_slots). The slots must add up to
        ``rules.recs_per_user`` (a single source fills every slot). Sources:
        segment_popularity, buy_again, also_bought, trending. The default,
        segment popularity alone, is the job as it was before the mix existed
        (same output).
      buy_again / also_bought / trending: each source's parameters.
    """

    mix: Tuple[tuple, ...] = (("segment_popularity", 4),)
    buy_again: BuyAgainConfig = field(default_factory=BuyAgainConfig)
    also_bought: AlsoBoughtConfig = field(default_factory=AlsoBoughtConfig)
    trending: TrendingConfig = field(default_factory=TrendingConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.mix, (tuple, list)) and len(self.mix) > 0,
                 "mix must be a non-empty list of [source, slots] pairs")
        pairs = []
        for pair in self.mix:
            _require(isinstance(pair, (tuple, list)) and len(pair) == 2,
                     f"mix entries are [source, slots] pairs, got {pair!r}")
            name, slots = pair
            _require(name in SOURCES, f"mix names unknown source {name!r}; sources: "
                     f"{', '.join(SOURCES)}")
            _require(isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1,
                     f"mix slots of {name} must be an integer >= 1, got {slots!r}")
            pairs.append((name, slots))
        names = [name for name, _ in pairs]
        _require(len(set(names)) == len(names), "mix names a source twice")
        object.__setattr__(self, "mix", tuple(pairs))  # a file gives lists

    @property
    def slots(self) -> int:
        """Total slots of the mix (equal to ``rules.recs_per_user``)."""
        return sum(slots for _, slots in self.mix)

    @property
    def sources(self) -> Tuple[str, ...]:
        """Source names in mix order."""
        return tuple(name for name, _ in self.mix)

    @property
    def popularity_only(self) -> bool:
        """True when the mix is segment popularity alone, unboosted: the pre-mix job, unchanged."""
        return self.sources == ("segment_popularity",) and not self.trending.boost_sources


@dataclass(frozen=True)
class StatusConfig:
    """What ``python -m pipelines.status`` calls an alarm (#19, docs/operations.md).

    Attributes:
      max_published_age_hours: the published recommendations (their newest
        ``generated_at``) may be at most this old; the daily batch plus two hours
        of slack, so one late run alarms and a normal one does not.
      max_streaming_health_age_minutes: the streaming job's newest
        ``streaming_health`` row may be at most this old (it writes one per period).
      runs_shown: the last runs listed and plotted.
      max_dead_letter_share: dead-lettered records per record read above which the
        last run is flagged (status) and the dead-letter alert policy fires.
    """

    max_published_age_hours: float = 26.0
    max_streaming_health_age_minutes: float = 30.0
    runs_shown: int = 10
    max_dead_letter_share: float = 0.01

    def __post_init__(self) -> None:
        _whole(self, "runs_shown")
        _finite(self, "max_published_age_hours", "max_streaming_health_age_minutes",
                "max_dead_letter_share")
        _require(self.max_published_age_hours > 0, "max_published_age_hours must be > 0")
        _require(self.max_streaming_health_age_minutes > 0,
                 "max_streaming_health_age_minutes must be > 0")
        _require(self.runs_shown >= 1, "runs_shown must be >= 1")
        _require(0 <= self.max_dead_letter_share <= 1,
                 "max_dead_letter_share must be within [0, 1]")


@dataclass(frozen=True)
class RankingNoticesConfig:
    """When the streaming job tells a vehicle's users that its list moved (docs/streaming.md).

    A stream order re-ranks its vehicle; its users get a ``segment_ranking_changed``
    refresh only when the change is one they would see, and not more often than
    a mail cadence needs.

    Attributes:
      min_changed_picks: SKUs of the vehicle's default picks that must differ from the
        picks its users were last told about (order within the list does not count: a
        reorder shows the same products). 1 = any new product.
      min_interval_hours: at most one notice per vehicle per this many hours of event
        time; a change inside the interval is noticed when it ends if it still holds
        (a flip and its flip back cost nothing). E-mails go out a few times a day, so 6.
        0 = no throttle.
    """

    min_changed_picks: int = 1
    min_interval_hours: float = 6.0

    def __post_init__(self) -> None:
        _whole(self, "min_changed_picks")
        _finite(self, "min_interval_hours")
        _require(self.min_changed_picks >= 1, "min_changed_picks must be >= 1")
        _require(self.min_interval_hours >= 0, "min_interval_hours must be >= 0")


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
    inputs: InputConfig = field(default_factory=InputConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    ranking_notices: RankingNoticesConfig = field(default_factory=RankingNoticesConfig)

    def __post_init__(self) -> None:
        # One source fills every slot whatever its count (so recs_per_user or a backtest's k
        # can change alone); a mix of several must say how the k slots are shared.
        _require(len(self.candidates.mix) == 1
                 or self.candidates.slots == self.rules.recs_per_user,
                 f"candidates.mix slots add up to {self.candidates.slots}, but "
                 f"rules.recs_per_user is {self.rules.recs_per_user}; make them equal")
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
