"""The automotive world's size and shape (`WorldSpec` and its presets), its hidden ground
truth, and the `World` every generator returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.contract import TABLES


@dataclass(frozen=True)
class WorldSpec:
    """Size and shape of a synthetic world; rates default to the field values in SPEC.md."""

    name: str = "custom"
    n_users: int = 20_000
    n_skus: int = 6_000
    n_makes: int = 40
    max_models_per_make: int = 6
    years_per_model: Tuple[int, int] = (6, 14)
    n_segments: int = 600              # vehicle (make, model, year) segments users may hold
    history_days: int = 120
    holdout_days: int = 28
    history_end: str = "2026-03-01T00:00:00Z"
    orders_per_user: float = 0.25      # mean orders per user in the history window
    views_per_user: float = 4.5        # mean browsing views per user in the history window
    campaign_share: float = 0.20       # share of users with a vehicle who are emailed
    segment_zipf: float = 0.85         # exponent of users-per-segment by segment rank
    repeat_rate: float = 0.18          # purchasers in history with two or more orders
    no_fitment_share: float = 0.65     # purchases of products without fitment rows
    segment_lift: float = 6.0          # owners' P(own top 4 parts) / P(global top 4 that fit)
    segment_rank_exponent: float = 1.0  # Zipf exponent of a segment's own favourites
    universal_share: float = 0.09      # universal (non-service) SKUs
    universal_broad_share: float = 0.30  # of those, the ones with fitment rows to most vehicles
    service_share: float = 0.01
    fit_missing_share: float = 0.06    # vehicle parts whose fitment data is missing
    make_broad_share: float = 0.04     # vehicle parts fitting whole makes (plugs, coils, ...)
    variant_share: float = 0.05        # SKUs in colour-variant groups of 2-3
    specialised_share: float = 0.005   # SKUs that are a specialised variant (e.g. ...HO)
    refurbished_share: float = 0.02
    http_image_share: float = 0.01
    conflicting_skus: int = 9          # SKUs listed twice with different part types
    null_vehicle_share: float = 0.02
    duplicate_email_share: float = 0.01
    mixed_case_email_share: float = 0.08
    thin_vehicle_share: float = 0.02   # held segments with fewer than 4 fitting parts
    duplicate_event_share: float = 0.005
    campaign_id: str = "CMP-2026-SPRING"
    n_treatments: int = 24
    delivered_rate: float = 0.741      # of sent
    open_rate: float = 0.108           # of sent
    click_rate: float = 0.0093         # of sent, including clicks without a tracked open
    ctr_mean: float = 0.074            # clicks among views, averaged over treatments
    ctr_best: float = 0.103
    order_after_click: float = 0.55    # clickers who order within 7 days

    @classmethod
    def preset(cls, name: str) -> "WorldSpec":
        """The named preset: `tiny` for tests, `demo` for a laptop, `full` for field scale."""
        presets = {
            "tiny": dict(n_users=1_500, n_skus=1_500, n_makes=12, max_models_per_make=4,
                         years_per_model=(4, 10), n_segments=120, history_days=90,
                         orders_per_user=0.30, views_per_user=6.0, campaign_share=0.6),
            "demo": dict(n_users=20_000, n_skus=6_000),
            "full": dict(n_users=500_000, n_skus=25_000, max_models_per_make=12,
                         years_per_model=(10, 28), n_segments=1_100, history_days=180,
                         orders_per_user=0.12, views_per_user=3.1, campaign_share=0.07),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(name=name, **presets[name])


@dataclass
class GroundTruth:
    """The hidden process behind a world, for tests and backtests (never written out)."""

    segments: pd.DataFrame       # segment_id, make, model, year, n_users, n_fitting, is_thin
    segment_top: pd.DataFrame    # segment_id, rank, sku, prob: favourite fitting parts
    global_top: pd.DataFrame     # rank, sku, prob: fitting parts most bought across all users
    segment_lift: pd.Series      # per segment: P(own top 4) / P(global top 4 it fits), owner
    segment_weight: float        # solved share of segment-specific taste in fitting purchases
    purchase_prob: np.ndarray    # per catalogue SKU (truth.skus order): mean purchase prob
    skus: np.ndarray             # unique SKUs, the index of purchase_prob
    no_fitment_share: float
    treatment_ctr: Dict[str, float]      # true click-through among views per treatment
    treatment_weights: Dict[str, float]  # share of sends per treatment
    unopened_click_rate: float   # clicks without a tracked open, per delivered non-opener
    campaign_orders: int         # orders caused by a click (in events or holdout)
    conflicting_skus: List[str]
    thin_segments: List[Tuple[str, str, int]]


@dataclass
class World:
    """Generated tables (pandas, contract field names), manifest and ground truth.

    ``spec`` and ``truth`` are the generator's own (`WorldSpec` and `GroundTruth` for the
    automotive world, `WholesaleSpec` and `WholesaleTruth` for the repeat-buyer one);
    ``arrow_schemas`` overrides the contract's Parquet schemas when a world's tables carry
    other user attributes (None: `contract.ARROW_SCHEMAS`)."""

    spec: Any
    seed: int
    catalog: pd.DataFrame
    fitment: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    holdout_events: pd.DataFrame
    treatment_events: pd.DataFrame
    manifest: dict
    truth: Any
    arrow_schemas: Optional[Dict[str, pa.Schema]] = None

    def tables(self) -> Dict[str, pd.DataFrame]:
        """The written tables by name."""
        return {name: getattr(self, name) for name in TABLES}
