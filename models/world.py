"""Seeded synthetic world of an automotive performance-parts retailer (SPEC §1-5).

`generate` builds the catalogue, fitment, users, behavioural events (plus a
later holdout period for backtests) and email-treatment events, with the field
statistics of SPEC.md and the anomalies real feeds carry; `World.truth` keeps
the propensities that produced them, so tests and backtests can check results
against a known answer. Columns are built with numpy/pyarrow, never per row,
so the full preset (500,000 users, ~2 million events) takes seconds.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENT_NAMES = ("Viewed Product", "Cart Update", "Placed Order", "Ordered Product",
               "Consumer Website Order")
TREATMENT_KINDS = ("SENT", "DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED")
FAILURE_REASONS = ("mailbox_full", "invalid_address", "blocked")
FAILURE_REASON_P = (0.30, 0.45, 0.25)
TABLES = ("catalog", "fitment", "users", "events", "holdout_events", "treatment_events")
DAY = 86_400
CURRENT_MODEL_YEAR = 2026

# Makes in popularity order for a performance-parts shop, each with models in popularity order.
MAKES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Ford", ("Mustang", "F-150", "Focus", "Fiesta", "Ranger", "Bronco", "Explorer", "Fusion",
              "Escape", "Taurus", "Crown Victoria", "Super Duty")),
    ("Chevrolet", ("Camaro", "Corvette", "Silverado 1500", "Impala", "Malibu", "Cruze",
                   "Colorado", "Tahoe", "S-10", "Cobalt", "Monte Carlo", "Suburban")),
    ("Honda", ("Civic", "Accord", "S2000", "Prelude", "Integra", "CR-V", "Fit", "Element",
               "Odyssey", "Pilot", "Ridgeline", "Del Sol")),
    ("Toyota", ("Supra", "Tacoma", "Tundra", "Camry", "Corolla", "4Runner", "Celica", "MR2",
                "GR86", "Land Cruiser", "RAV4", "Prius")),
    ("Subaru", ("WRX", "WRX STI", "BRZ", "Impreza", "Legacy", "Forester", "Outback",
                "Crosstrek")),
    ("Nissan", ("350Z", "370Z", "GT-R", "Altima", "Sentra", "240SX", "Frontier", "Titan",
                "Maxima", "Xterra", "Pathfinder", "Skyline")),
    ("Dodge", ("Challenger", "Charger", "Viper", "Durango", "Dart", "Neon", "Dakota", "Caliber")),
    ("Volkswagen", ("Golf GTI", "Golf R", "Jetta", "Passat", "Beetle", "Tiguan", "Corrado",
                    "Scirocco")),
    ("BMW", ("M3", "3 Series", "5 Series", "M5", "Z4", "1 Series", "X5", "M2")),
    ("Mazda", ("MX-5 Miata", "RX-7", "RX-8", "Mazda3", "Mazda6", "CX-5", "Protege")),
    ("Jeep", ("Wrangler", "Grand Cherokee", "Cherokee", "Gladiator", "Liberty", "Compass")),
    ("Ram", ("1500", "2500", "3500")),
    ("Mitsubishi", ("Lancer Evolution", "Eclipse", "3000GT", "Lancer", "Outlander")),
    ("Audi", ("A4", "S4", "RS4", "A3", "S3", "TT", "R8", "A6")),
    ("Hyundai", ("Genesis Coupe", "Veloster", "Elantra", "Sonata", "Tucson")),
    ("Acura", ("RSX", "TSX", "NSX", "Integra", "TL", "ILX")),
    ("Lexus", ("IS 300", "IS 350", "GS 300", "RC F", "LS 400", "SC 300")),
    ("Infiniti", ("G35", "G37", "Q50", "Q60", "FX35")),
    ("GMC", ("Sierra 1500", "Canyon", "Yukon", "Sonoma")),
    ("Pontiac", ("Firebird", "GTO", "G8", "Grand Prix", "Solstice")),
    ("Mercedes-Benz", ("C-Class", "E-Class", "C63 AMG", "SLK", "CLA", "G-Class")),
    ("Porsche", ("911", "Cayman", "Boxster", "Cayenne", "Macan")),
    ("Kia", ("Stinger", "Optima", "Forte", "Soul", "Sorento")),
    ("Cadillac", ("CTS-V", "ATS", "Escalade", "CTS")),
    ("Chrysler", ("300", "300C", "Crossfire", "PT Cruiser")),
    ("Mini", ("Cooper", "Cooper S", "Clubman", "Countryman")),
    ("Scion", ("FR-S", "tC", "xB")),
    ("Lincoln", ("Mark VIII", "LS", "Navigator", "Town Car")),
    ("Buick", ("Grand National", "Regal", "LaCrosse")),
    ("Volvo", ("240", "850", "S60", "V70", "XC90")),
    ("Tesla", ("Model 3", "Model S", "Model Y")),
    ("Genesis", ("G70", "G80")),
    ("Saab", ("9-3", "9-5", "900")),
    ("Fiat", ("500 Abarth", "124 Spider", "500")),
    ("Alfa Romeo", ("Giulia", "4C", "Stelvio")),
    ("Plymouth", ("Barracuda", "Road Runner", "Duster")),
    ("Land Rover", ("Defender", "Range Rover", "Discovery")),
    ("Jaguar", ("F-Type", "XF", "XJ")),
    ("Suzuki", ("Swift", "Samurai", "SX4", "Grand Vitara")),
    ("Lotus", ("Elise", "Exige", "Evora")),
)

# Fictional brands with their SKU codes (colour-variant groups are named code + number, e.g. RA003).
BRANDS: Tuple[Tuple[str, str], ...] = (
    ("RaceAxis", "RA"), ("Voltline", "VL"), ("Apex Forge", "AF"), ("Torque Theory", "TT"),
    ("Nitro Works", "NW"), ("Redline Supply", "RS"), ("Carbon Kinetic", "CK"),
    ("Boost Labs", "BL"), ("Gridline", "GL"), ("Ironclad Garage", "IG"),
    ("Velocity Dynamics", "VD"), ("Track Ready", "TR"), ("Hotrod House", "HH"),
    ("Streetline", "SL"), ("Piston Peak", "PP"), ("Turbo Tribe", "TB"), ("Shift Science", "SS"),
    ("Pro Stance", "PS"), ("Drift Dept", "DD"), ("Octane Outfitters", "OO"),
    ("Blue Flame", "BF"), ("Quarter Mile Co", "QM"), ("Pit Lane", "PL"), ("Motive Parts", "MP"),
    ("Lumen Auto", "LA"), ("Stopping Power", "SP"), ("Coolflow", "CF"), ("Sparkwell", "SW"),
    ("Fuel First", "FF"), ("Gearhead Goods", "GG"), ("Northshore Tuning", "NT"),
    ("Autobahn Alloy", "AA"), ("Canyon Carve", "CC"), ("Desert Run", "DR"),
    ("Eastbound Engineering", "EE"), ("Heel Toe", "HT"), ("Monarch Moto", "MM"),
    ("Westcoast Wrench", "WW"), ("Zenith Performance", "ZP"), ("Garage Nine", "GN"),
)

# Base-product classes: how a product relates to fitment.
SPECIFIC, MAKE_BROAD, FIT_MISSING, UNIVERSAL_BROAD, UNIVERSAL, SERVICE = range(6)
CLASS_NAMES = ("specific", "make_broad", "fit_missing", "universal_broad", "universal", "service")

# Part types: name, SKU code, median price, log-sd, colour-variant capable, and relative
# frequency within each class (specific, make_broad, fit_missing, universal_broad, universal).
PART_TYPES: Tuple[Tuple, ...] = (
    ("Headlight", "HL", 320, 0.50, True, (6, 0, 2, 5, 0)),
    ("Tail Light", "TL", 240, 0.50, True, (4, 0, 1, 0, 0)),
    ("Intake", "INT", 330, 0.40, False, (6, 0, 3, 0, 0)),
    ("Exhaust", "EXH", 950, 0.50, False, (7, 0, 3, 0, 0)),
    ("Coilover", "CO", 1350, 0.40, False, (5, 0, 2, 0, 0)),
    ("Brake Kit", "BRK", 1150, 0.55, False, (5, 1, 2, 0, 0)),
    ("Turbo", "TRB", 1950, 0.45, False, (3, 0, 2, 0, 0)),
    ("Intercooler", "IC", 780, 0.40, False, (3, 0, 1, 0, 0)),
    ("Clutch Kit", "CLU", 640, 0.40, False, (4, 0, 1, 0, 0)),
    ("Console Latch", "LATCH", 38, 0.35, False, (4, 0, 1, 0, 0)),
    ("Ignition Coil", "IGN-COIL", 80, 0.45, False, (2, 6, 1, 0, 0)),
    ("Spark Plug", "SPK", 14, 0.40, False, (1, 5, 1, 2, 0)),
    ("Wheel", "WHL", 420, 0.50, True, (3, 3, 2, 3, 0)),
    ("Sway Bar", "SWAY", 290, 0.40, False, (3, 0, 1, 0, 0)),
    ("Radiator", "RAD", 430, 0.45, False, (3, 1, 1, 0, 0)),
    ("Fuel Pump", "FP", 270, 0.50, False, (2, 3, 1, 0, 0)),
    ("Lowering Springs", "SPR", 310, 0.35, False, (3, 0, 1, 0, 0)),
    ("Brake Pads", "PAD", 85, 0.45, False, (3, 4, 1, 0, 0)),
    ("Grille", "GRL", 260, 0.50, True, (3, 0, 1, 0, 0)),
    ("Mirror", "MIR", 160, 0.50, True, (2, 0, 1, 0, 0)),
    ("Door Handle", "DH", 45, 0.40, True, (2, 0, 1, 0, 0)),
    ("Seat", "SEAT", 900, 0.50, True, (1, 0, 1, 3, 0)),
    ("Steering Wheel", "STW", 340, 0.45, True, (1, 0, 1, 3, 0)),
    ("Floor Mats", "MAT", 95, 0.40, True, (2, 0, 1, 3, 0)),
    ("Performance Tuner", "TUNE", 680, 0.30, False, (2, 2, 6, 0, 0)),
    ("Engine Bolt Kit", "EBK", 110, 0.40, False, (2, 2, 1, 0, 0)),
    ("Distributor Cap", "DCAP", 55, 0.35, False, (1, 3, 1, 0, 0)),
    ("Gasket", "GSK", 18, 0.50, False, (4, 1, 1, 0, 0)),
    ("Bolt Set", "BOLT", 22, 0.40, False, (2, 1, 1, 0, 0)),
    ("Wiper Blade", "WIPER", 24, 0.30, False, (0, 0, 0, 4, 2)),
    ("Gauge", "GAUGE", 190, 0.50, False, (0, 0, 0, 2, 3)),
    ("Motor Oil", "OIL", 38, 0.35, False, (0, 0, 0, 0, 6)),
    ("Coolant", "CLNT", 24, 0.30, False, (0, 0, 0, 0, 3)),
    ("Brake Fluid", "BFL", 16, 0.30, False, (0, 0, 0, 0, 2)),
    ("Tool Kit", "TOOL", 140, 0.70, False, (0, 0, 0, 0, 4)),
    ("Floor Jack", "JACK", 280, 0.50, False, (0, 0, 0, 0, 2)),
    ("T-Shirt", "TEE", 28, 0.25, True, (0, 0, 0, 0, 4)),
    ("Hat", "HAT", 26, 0.25, True, (0, 0, 0, 0, 3)),
    ("Detailing Kit", "DET", 60, 0.50, False, (0, 0, 0, 0, 3)),
    ("Shift Knob", "KNOB", 65, 0.45, True, (0, 0, 0, 0, 3)),
    ("Dash Camera", "DCAM", 190, 0.40, False, (0, 0, 0, 0, 2)),
    ("Car Cover", "COVER", 150, 0.40, True, (0, 0, 0, 0, 2)),
    ("Decal", "DEC", 9, 0.45, True, (0, 0, 0, 0, 3)),
    ("Clamp", "CLMP", 8, 0.40, False, (0, 0, 0, 0, 3)),
    ("Valve Stem Cap", "VSC", 7, 0.35, True, (0, 0, 0, 0, 2)),
)
SERVICE_TYPES: Tuple[Tuple[str, str, float, float], ...] = (
    ("Installation", "SVC-INSTALL", 190, 0.50), ("Labor", "SVC-LABOR", 120, 0.50),
    ("Dyno Tune", "SVC-DYNO", 560, 0.30),
)
LOW_VALUE_TYPES = ("Gasket", "Bolt Set", "Decal", "Clamp", "Valve Stem Cap")
LOW_VALUE_EXCEPTIONS = ("Engine Bolt Kit", "Distributor Cap")
PERFORMANCE_TYPES = frozenset({"Intake", "Exhaust", "Coilover", "Brake Kit", "Turbo",
                               "Intercooler", "Clutch Kit", "Sway Bar", "Lowering Springs",
                               "Performance Tuner"})
COLOURS = (("B", "Black"), ("R", "Red"), ("W", "White"), ("S", "Silver"))
UNIVERSAL_ADJECTIVES = ("Pro", "Classic", "Garage", "Track", "Everyday", "Premium")

FIRST_NAMES = ("james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda",
               "william", "elizabeth", "david", "barbara", "richard", "susan", "joseph", "jessica",
               "thomas", "sarah", "chris", "karen", "daniel", "nancy", "matt", "lisa", "tony",
               "betty", "mark", "sandra", "steve", "ashley", "paul", "kim", "andrew", "emily",
               "josh", "donna", "kevin", "michelle", "brian", "carol", "george", "amanda",
               "ed", "melissa", "ryan", "deb", "jacob", "laura", "gary", "rebecca", "nick",
               "sharon", "eric", "cynthia", "jon", "kathleen", "sam", "amy", "luis", "angela",
               "carlos", "maria", "jose", "ana", "wei", "mei", "raj", "priya", "kenji", "yuki")
LAST_NAMES = ("smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis",
              "rodriguez", "martinez", "hernandez", "lopez", "gonzalez", "wilson", "anderson",
              "thomas", "taylor", "moore", "jackson", "martin", "lee", "perez", "thompson",
              "white", "harris", "sanchez", "clark", "ramirez", "lewis", "robinson", "walker",
              "young", "allen", "king", "wright", "scott", "torres", "nguyen", "hill", "flores",
              "green", "adams", "nelson", "baker", "hall", "rivera", "campbell", "mitchell",
              "carter", "roberts", "chen", "patel", "kim", "tanaka", "singh", "murphy")
EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com",
                 "aol.com", "comcast.net", "protonmail.com")
EMAIL_DOMAIN_P = (0.44, 0.16, 0.12, 0.10, 0.08, 0.04, 0.03, 0.03)

# Bad-row kinds per table; the first two exist only as text, so Parquet cannot hold them.
TEXT_ONLY_KINDS = frozenset({"malformed_json", "truncated_line"})
BAD_KINDS: Dict[str, Tuple[str, ...]] = {
    "events": ("malformed_json", "truncated_line", "missing_field", "unknown_event_name",
               "negative_price", "nan_price", "unknown_sku"),
    "users": ("malformed_json", "truncated_line", "missing_field"),
    "catalog": ("malformed_json", "truncated_line", "missing_field", "negative_price",
                "nan_price"),
    "fitment": ("malformed_json", "truncated_line", "missing_field", "unknown_sku"),
}
MISSING_FIELDS = {"events": ("user_id", "sku", "event_time"), "users": ("user_id", "email"),
                  "catalog": ("price", "part_type"), "fitment": ("year", "make")}
UNKNOWN_EVENT_NAMES = ("Added To Wishlist", "Product Returned", "viewed product")
# Fresh keys for bad rows, outside every range the generator uses for real rows.
BAD_ID_PREFIX = {"events": "E9", "users": "U9", "catalog": "HL-9", "fitment": "HL-9"}
UNKNOWN_SKU_PREFIX = "HL-8"

_STRING = pa.string()
ARROW_SCHEMAS: Dict[str, pa.Schema] = {
    "catalog": pa.schema([("sku", _STRING), ("title", _STRING), ("part_type", _STRING),
                          ("brand", _STRING), ("price", pa.float64()), ("image_url", _STRING),
                          ("tags", pa.list_(_STRING)), ("is_universal", pa.bool_()),
                          ("variant_group", _STRING)]),
    "fitment": pa.schema([("sku", _STRING), ("make", _STRING), ("model", _STRING),
                          ("year", pa.int64())]),
    "users": pa.schema([("user_id", _STRING), ("email", _STRING), ("make", _STRING),
                        ("model", _STRING), ("year", pa.int64()), ("updated_at", _STRING)]),
    "events": pa.schema([("event_id", _STRING), ("event_time", _STRING), ("user_id", _STRING),
                         ("event_name", _STRING), ("sku", _STRING), ("quantity", pa.int64()),
                         ("price", pa.float64()), ("order_id", _STRING)]),
    "treatment_events": pa.schema([("event_id", _STRING), ("event_time", _STRING),
                                   ("user_id", _STRING), ("treatment_id", _STRING),
                                   ("campaign_id", _STRING), ("kind", _STRING),
                                   ("reason", _STRING)]),
}
ARROW_SCHEMAS["holdout_events"] = ARROW_SCHEMAS["events"]


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
    """Generated tables (pandas, contract field names), manifest and ground truth."""

    spec: WorldSpec
    seed: int
    catalog: pd.DataFrame
    fitment: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    holdout_events: pd.DataFrame
    treatment_events: pd.DataFrame
    manifest: dict
    truth: GroundTruth

    def tables(self) -> Dict[str, pd.DataFrame]:
        """The written tables by name."""
        return {name: getattr(self, name) for name in TABLES}


# ----------------------------------------------------------------------------- helpers

def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of the integer ranges [start, start + length), vectorised."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(total)


def _group_rank(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank (0 = largest key) of every element within its group."""
    order = np.lexsort((-key, group))
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    pos = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    rank = np.empty(len(g), np.int64)
    rank[order] = pos
    return rank


def _group_sum(group: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sum of values per group id in [0, n)."""
    return np.bincount(group, weights=values, minlength=n)


def _arrow(values) -> pa.Array:
    """A small Python/numpy sequence of strings as an Arrow string array."""
    return pa.array(list(values), _STRING)


def _take(dictionary: pa.Array, idx: np.ndarray, null: Optional[np.ndarray] = None) -> pd.Series:
    """String column dictionary[idx] (null where `null`), built in Arrow, not per row."""
    indices = pa.array(np.asarray(idx, np.int64), mask=null)
    return pd.Series(dictionary.take(indices), dtype="str")


def _digits(m: np.ndarray, col: int, values: np.ndarray, width: int) -> None:
    """Write `values` as zero-padded decimal ASCII into columns [col, col + width) of m."""
    v = values.astype(np.int64, copy=True)
    for j in range(col + width - 1, col - 1, -1):
        m[:, j] = v % 10 + 48
        v //= 10


def _fixed_strings(m: np.ndarray, null: Optional[np.ndarray] = None) -> pd.Series:
    """Rows of an ASCII byte matrix as a string column (Arrow buffers, no per-row work)."""
    n, width = m.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    validity = None
    if null is not None:
        validity = pa.py_buffer(np.packbits(~null, bitorder="little"))
    arr = pa.Array.from_buffers(_STRING, n, [validity, pa.py_buffer(offsets),
                                             pa.py_buffer(np.ascontiguousarray(m).ravel())])
    return pd.Series(arr, dtype="str")


def _ids(prefix: str, numbers: np.ndarray, width: int,
         null: Optional[np.ndarray] = None) -> pd.Series:
    """Identifiers like U0000001: prefix plus zero-padded number."""
    p = prefix.encode()
    m = np.empty((len(numbers), len(p) + width), np.uint8)
    m[:, :len(p)] = np.frombuffer(p, np.uint8)
    _digits(m, len(p), numbers, width)
    return _fixed_strings(m, null)


def _rfc3339(seconds: np.ndarray) -> pd.Series:
    """Epoch seconds as RFC 3339 UTC strings (2026-03-01T12:00:00Z)."""
    seconds = np.asarray(seconds, np.int64)
    days = seconds // DAY
    uniq, inv = np.unique(days, return_inverse=True)
    dates = np.datetime_as_string(uniq.astype("datetime64[D]")).astype("S10")
    m = np.empty((len(seconds), 20), np.uint8)
    m[:, :10] = np.frombuffer(dates.tobytes(), np.uint8).reshape(-1, 10)[inv]
    sod = seconds - days * DAY
    for col, value in ((11, sod // 3600), (14, sod // 60 % 60), (17, sod % 60)):
        _digits(m, col, value, 2)
    m[:, 10], m[:, 13], m[:, 16], m[:, 19] = ord("T"), ord(":"), ord(":"), ord("Z")
    return _fixed_strings(m)


def _epoch(rfc3339: str) -> int:
    """Epoch seconds of an RFC 3339 UTC timestamp."""
    return int(pd.Timestamp(rfc3339).timestamp())


def _iso(seconds: int) -> str:
    """RFC 3339 UTC string of epoch seconds."""
    return _rfc3339(np.array([seconds]))[0]


@dataclass
class _Categorical:
    """Many categorical distributions packed in one array, sampled with one searchsorted."""

    key: np.ndarray    # group + cumulative probability within the group (last = group + 1)
    value: np.ndarray  # the outcome of each entry
    size: np.ndarray   # entries per group

    @classmethod
    def build(cls, group: np.ndarray, value: np.ndarray, prob: np.ndarray,
              n_groups: int) -> "_Categorical":
        """Pack (group, value, prob) entries; probabilities are normalised per group."""
        order = np.argsort(group, kind="stable")
        group, value, prob = group[order], value[order], prob[order].astype(np.float64)
        size = np.bincount(group, minlength=n_groups)
        total = _group_sum(group, prob, n_groups)
        cum = np.cumsum(prob)
        before = np.r_[0.0, cum][np.r_[0, np.cumsum(size)][:-1]]
        key = group + (cum - before[group]) / total[group]
        last = np.cumsum(size)[size > 0] - 1
        key[last] = group[last] + 1.0
        return cls(key, value, size)

    def sample(self, rng: np.random.Generator, group: np.ndarray) -> np.ndarray:
        """One outcome per element of `group` (every group must have entries)."""
        u = np.minimum(rng.random(len(group)), 1.0 - 1e-9)
        return self.value[np.searchsorted(self.key, group + u, side="right")]


@dataclass
class _Propensity:
    """Purchase and browsing distributions of every segment (K = users without vehicle)."""

    fit: _Categorical      # per segment: parts with fitment rows that fit it
    nofit: _Categorical    # one group: products without fitment rows
    browse: _Categorical   # one group: what people look at regardless of vehicle
    p_nofit: float

    def purchase(self, rng: np.random.Generator, seg: np.ndarray) -> np.ndarray:
        """Item bought by owners of `seg`: a no-fitment product or a part fitting the vehicle."""
        fit = (rng.random(len(seg)) >= self.p_nofit) & (self.fit.size[seg] > 0)
        out = np.empty(len(seg), np.int64)
        out[fit] = self.fit.sample(rng, seg[fit])
        out[~fit] = self.nofit.sample(rng, np.zeros(int((~fit).sum()), np.int64))
        return out

    def view(self, rng: np.random.Generator, seg: np.ndarray) -> np.ndarray:
        """Item viewed while browsing: mostly what the segment buys, partly anything popular."""
        out = self.purchase(rng, seg)
        other = rng.random(len(seg)) < 0.4
        out[other] = self.browse.sample(rng, np.zeros(int(other.sum()), np.int64))
        return out


# ----------------------------------------------------------------------------- vehicles & users

@dataclass
class _Vehicles:
    """The vehicle universe: every (make, model, year) that parts can fit."""

    make_names: pa.Array
    model_names: pa.Array
    model_make: np.ndarray
    model_first: np.ndarray   # first vehicle of each model (sorted by make, model, year)
    model_len: np.ndarray
    model_start: np.ndarray   # first model year
    model_pop: np.ndarray
    make_pop: np.ndarray
    veh_make: np.ndarray
    veh_model: np.ndarray
    veh_year: np.ndarray


def _vehicles(spec: WorldSpec, rng: np.random.Generator) -> _Vehicles:
    """Makes (popularity-ordered), their models and production years."""
    makes = MAKES[:spec.n_makes]
    make_pop = (np.arange(len(makes)) + 1.0) ** -1.0
    names, model_make, start, length, pop = [], [], [], [], []
    lo, hi = spec.years_per_model
    for mi, (_, models) in enumerate(makes):
        n_models = int(np.clip(round(spec.max_models_per_make * (mi + 1) ** -0.35), 1,
                               len(models)))
        for j in range(n_models):
            span = int(rng.integers(lo, hi + 1))
            end = CURRENT_MODEL_YEAR - (0 if rng.random() < 0.5 else int(rng.integers(1, 20)))
            first = max(1970, end - span + 1)
            names.append(models[j])
            model_make.append(mi)
            start.append(first)
            length.append(end - first + 1)
            pop.append(make_pop[mi] * (j + 1.0) ** -0.8)
    model_make, length = np.array(model_make), np.array(length)
    start = np.array(start)
    veh_model = np.repeat(np.arange(len(names)), length)
    first = np.r_[0, np.cumsum(length)][:-1]
    return _Vehicles(
        make_names=_arrow(m for m, _ in makes), model_names=_arrow(names),
        model_make=model_make, model_first=first, model_len=length, model_start=start,
        model_pop=np.array(pop), make_pop=make_pop, veh_make=model_make[veh_model],
        veh_model=veh_model,
        veh_year=start[veh_model] + np.arange(len(veh_model)) - first[veh_model])


def _segments(spec: WorldSpec, veh: _Vehicles,
              rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Vehicles users may hold and each one's share of users: Zipf over a popularity order."""
    age = CURRENT_MODEL_YEAR - veh.veh_year
    weight = veh.model_pop[veh.veh_model] * np.exp(-age / 12.0) * rng.lognormal(0, 0.5, len(age))
    k = min(spec.n_segments, len(age))
    chosen = rng.choice(len(age), k, replace=False, p=weight / weight.sum())
    chosen = chosen[np.argsort(-weight[chosen] * rng.lognormal(0, 0.5, k))]
    share = (np.arange(k) + 1.0) ** -spec.segment_zipf
    return chosen, share / share.sum()


def _solve_gamma_shape(mean: float, repeat: float) -> float:
    """Gamma shape k of per-user order rates so that, with Poisson orders of mean `mean`,
    the share of purchasers with two or more orders is `repeat` (negative binomial)."""
    def repeat_share(k: float) -> float:
        q = k / (k + mean)
        p0 = q ** k
        return 1.0 - k * q ** k * (1 - q) / (1.0 - p0)

    lo, hi = math.log(1e-4), math.log(1e4)
    for _ in range(80):
        mid = (lo + hi) / 2
        if repeat_share(math.exp(mid)) > repeat:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _emails(spec: WorldSpec, n: int, rng: np.random.Generator) -> Tuple[pa.Array, dict]:
    """Unique addresses, some in mixed case, plus ~1% repeats of another user's address in
    a different case; returns the emails and which users repeat whom."""
    first = np.array(FIRST_NAMES)
    last = np.array(LAST_NAMES)
    mixed = rng.random(n) < spec.mixed_case_email_share
    fi = rng.integers(0, len(first), n) + len(first) * mixed
    li = rng.integers(0, len(last), n) + len(last) * mixed
    di = rng.choice(len(EMAIL_DOMAINS), n, p=EMAIL_DOMAIN_P) + len(EMAIL_DOMAINS) * mixed
    firsts = _arrow(np.r_[first, np.strings.capitalize(first)])
    lasts = _arrow(np.r_[last, np.strings.capitalize(last)])
    domains = _arrow(np.r_[EMAIL_DOMAINS, np.strings.capitalize(np.array(EMAIL_DOMAINS))])
    seps = _arrow([".", "_", ""]).take(pa.array(rng.choice(3, n, p=[0.6, 0.2, 0.2])))
    number = pa.array((np.arange(n) + 1).astype(str))  # unique, so addresses are unique
    email = pc.binary_join_element_wise(
        firsts.take(pa.array(fi)), seps, lasts.take(pa.array(li)), number, pa.scalar("@"),
        domains.take(pa.array(di)), "")
    n_dup = int(round(spec.duplicate_email_share * n))
    perm = rng.permutation(n)
    dup, src = np.sort(perm[:n_dup]), perm[n_dup:2 * n_dup]
    source = email.take(pa.array(src))
    lower = pc.utf8_lower(source)
    variant = pc.if_else(pc.equal(source, lower), pc.utf8_upper(source), lower)
    index = np.arange(n)
    index[dup] = n + np.arange(n_dup)
    email = pa.concat_arrays([email, variant]).take(pa.array(index))
    return email, {"duplicate": dup, "source": src, "mixed": int(mixed.sum())}


# ----------------------------------------------------------------------------- catalogue

@dataclass
class _Catalogue:
    """Every unique SKU as arrays, plus its fitment rows (item, vehicle)."""

    sku: pa.Array
    cls: np.ndarray
    ptype: np.ndarray
    brand: np.ndarray
    price: np.ndarray
    title: List[str]
    variant_group: List[Optional[str]]
    specialised: np.ndarray   # bool: a specialised variant of another SKU
    fit_item: np.ndarray
    fit_veh: np.ndarray
    n_fit_veh: np.ndarray     # fitting vehicles per item


def _counts(spec: WorldSpec, rng: np.random.Generator) -> Tuple[Dict[int, int], np.ndarray, int]:
    """Base products per class, colour-group sizes and specialised-variant count."""
    n = spec.n_skus
    n_groups = int(round(spec.variant_share * n / 2.5))
    sizes = rng.integers(2, 4, n_groups)
    n_spec = int(round(spec.specialised_share * n))
    n_service = max(1, int(round(spec.service_share * n)))
    n_base = n - int((sizes - 1).sum()) - n_spec - n_service
    n_univ = int(round(spec.universal_share * n))
    n_ub = max(1, int(round(n_univ * spec.universal_broad_share)))
    per_class = {UNIVERSAL_BROAD: n_ub, UNIVERSAL: n_univ - n_ub, SERVICE: n_service,
                 FIT_MISSING: int(round(spec.fit_missing_share * n)),
                 MAKE_BROAD: int(round(spec.make_broad_share * n))}
    per_class[SPECIFIC] = n_base - sum(v for c, v in per_class.items() if c != SERVICE)
    return per_class, sizes, n_spec


def _base_fitment(cls: np.ndarray, veh: _Vehicles, rng: np.random.Generator):
    """Fitment of base products as (base, vehicle) rows, by class:
    specific parts fit a year window of one model (a quarter also sibling models),
    make-broad parts fit a year window across 1-3 makes, universal-broad parts fit most
    vehicles (the "generic headlight"); other classes have no rows."""
    n_veh = len(veh.veh_make)
    n_models = len(veh.model_make)
    rows_b, rows_v = [], []

    spec_idx = np.flatnonzero(cls == SPECIFIC)
    p = veh.model_pop ** 0.7
    model = rng.choice(n_models, len(spec_idx), p=p / p.sum())
    span = veh.model_len[model]
    offset = rng.integers(0, span)
    length = np.minimum(rng.geometric(0.22, len(spec_idx)), span - offset)
    y0 = veh.model_start[model] + offset
    y1 = y0 + length - 1
    spans_b, spans_start, spans_len = [spec_idx], [veh.model_first[model] + offset], [length]
    for step, share in ((1, 0.25), (2, 0.10)):
        sib = model + step
        ok = (rng.random(len(spec_idx)) < share) & (sib < n_models)
        sib = np.where(ok, sib, model)
        ok &= veh.model_make[sib] == veh.model_make[model]
        lo = np.maximum(y0, veh.model_start[sib])
        hi = np.minimum(y1, veh.model_start[sib] + veh.model_len[sib] - 1)
        ok &= hi >= lo
        spans_b.append(spec_idx[ok])
        spans_start.append((veh.model_first[sib] + lo - veh.model_start[sib])[ok])
        spans_len.append((hi - lo + 1)[ok])
    span_len = np.concatenate(spans_len)
    rows_b.append(np.repeat(np.concatenate(spans_b), span_len))
    rows_v.append(_ranges(np.concatenate(spans_start), span_len))

    mb = np.flatnonzero(cls == MAKE_BROAD)
    n_makes = len(veh.make_pop)
    picks = rng.choice(n_makes, (len(mb), 3), p=veh.make_pop / veh.make_pop.sum())
    picks[:, 1:] = np.where(rng.random((len(mb), 2)) < 0.4, picks[:, 1:], picks[:, :1])
    make_sel = np.zeros((len(mb), n_makes), bool)
    make_sel[np.arange(len(mb))[:, None], picks] = True
    y_lo = rng.integers(1990, 2020, len(mb))
    y_hi = y_lo + rng.integers(5, 30, len(mb))
    fits = (make_sel[:, veh.veh_make] & (veh.veh_year >= y_lo[:, None])
            & (veh.veh_year <= y_hi[:, None]))
    b, v = np.nonzero(fits)
    rows_b.append(mb[b])
    rows_v.append(v)

    ub = np.flatnonzero(cls == UNIVERSAL_BROAD)
    coverage = rng.uniform(0.55, 0.98, len(ub))
    b, v = np.nonzero(rng.random((len(ub), n_veh)) < coverage[:, None])
    rows_b.append(ub[b])
    rows_v.append(v)
    return np.concatenate(rows_b), np.concatenate(rows_v)


def _cover_then_draw(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """n draws from `weight` that include every possible outcome once when n allows,
    so even a tiny catalogue has every part type (low-value ones included)."""
    possible = np.flatnonzero(weight > 0)
    if n < len(possible):
        return rng.choice(len(weight), n, p=weight / weight.sum())
    rest = rng.choice(len(weight), n - len(possible), p=weight / weight.sum())
    return rng.permutation(np.r_[possible, rest])


def _catalogue(spec: WorldSpec, veh: _Vehicles, thin_veh: np.ndarray,
               rng: np.random.Generator) -> _Catalogue:
    """Products (base, colour variants, specialised variants, services) and their fitment."""
    per_class, sizes, n_spec = _counts(spec, rng)
    cls = np.concatenate([np.full(per_class[c], c) for c in range(6)])
    n_base = len(cls)
    n_types = len(PART_TYPES)
    ptype = np.empty(n_base, np.int64)
    for c in range(6):
        w = (np.array([t[5][c] for t in PART_TYPES], float) if c != SERVICE
             else np.r_[np.zeros(n_types), np.ones(len(SERVICE_TYPES))])
        ptype[cls == c] = _cover_then_draw(rng, w, per_class[c])
    all_types = [t[:4] for t in PART_TYPES] + list(SERVICE_TYPES)
    median = np.array([t[2] for t in all_types], float)[ptype]
    sigma = np.array([t[3] for t in all_types])[ptype]
    price = np.floor(np.clip(rng.lognormal(np.log(median), sigma), 5, 3999)) + 0.99
    bp = (np.arange(len(BRANDS)) + 1.0) ** -0.7
    brand = rng.choice(len(BRANDS), n_base, p=bp / bp.sum())

    fb, fv = _base_fitment(cls, veh, rng)

    # Colour groups from visual products; specialised variants from the other vehicle parts.
    visual = np.array([t[4] for t in PART_TYPES] + [False] * len(SERVICE_TYPES))[ptype]
    group_base = rng.choice(np.flatnonzero(visual), len(sizes), replace=False)
    spec_pool = np.flatnonzero(~visual & np.isin(cls, (SPECIFIC, MAKE_BROAD)))
    spec_base = rng.choice(spec_pool, n_spec, replace=False)
    single = np.setdiff1d(np.arange(n_base), group_base)
    item_base = np.concatenate([single, np.repeat(group_base, sizes), spec_base])
    n_items = len(item_base)
    specialised = np.zeros(n_items, bool)
    specialised[n_items - n_spec:] = True

    type_counter = np.zeros(len(all_types), np.int64)
    base_sku = []
    for t in ptype:
        base_sku.append(f"{all_types[t][1]}-{100 + type_counter[t]}")
        type_counter[t] += 1
    # Year window and model of specific parts, for titles.
    first_veh = np.full(n_base, -1)
    last_veh = np.full(n_base, -1)
    order = np.lexsort((fv, fb))
    fb_sorted, fv_sorted = fb[order], fv[order]
    starts = np.flatnonzero(np.r_[True, fb_sorted[1:] != fb_sorted[:-1]])
    first_veh[fb_sorted[starts]] = fv_sorted[starts]
    ends = np.r_[starts[1:], len(fb_sorted)] - 1
    last_veh[fb_sorted[ends]] = fv_sorted[ends]
    make_names = veh.make_names.to_pylist()
    model_names = veh.model_names.to_pylist()

    def base_title(b: int) -> str:
        name, brand_name = all_types[ptype[b]][0], BRANDS[brand[b]][0]
        c = cls[b]
        if c == SERVICE:
            return f"{name} Service ({('Standard', 'Premium')[b % 2]})"
        if c in (SPECIFIC, MAKE_BROAD) and first_veh[b] >= 0:
            v0, v1 = first_veh[b], last_veh[b]
            make = make_names[veh.veh_make[v0]]
            if c == MAKE_BROAD:
                return f"{brand_name} {name} for {make} and more"
            # A platform part's last vehicle may be a sibling model: title the first model.
            y1 = veh.veh_year[v1] if veh.veh_model[v1] == veh.veh_model[v0] else veh.veh_year[v0]
            return (f"{brand_name} {name} for {make} {model_names[veh.veh_model[v0]]} "
                    f"{veh.veh_year[v0]}-{y1}")
        if c in (UNIVERSAL, UNIVERSAL_BROAD):
            return f"{brand_name} {UNIVERSAL_ADJECTIVES[b % len(UNIVERSAL_ADJECTIVES)]} {name}"
        return f"{brand_name} {name}"

    titles = [base_title(b) for b in range(n_base)]
    sku = [base_sku[b] for b in single]
    title = [titles[b] for b in single]
    variant_group: List[Optional[str]] = [None] * len(single)
    brand_counter = np.zeros(len(BRANDS), np.int64)
    for b, size in zip(group_base, sizes):
        brand_counter[brand[b]] += 1
        gid = f"{BRANDS[brand[b]][1]}{brand_counter[brand[b]]:03d}"
        for code, colour in [COLOURS[i] for i in sorted(rng.choice(len(COLOURS), size, False))]:
            sku.append(gid + code)
            title.append(f"{titles[b]} - {colour}")
            variant_group.append(gid)
    for b in spec_base:
        high_output = all_types[ptype[b]][0] in ("Ignition Coil", "Turbo", "Intake", "Exhaust")
        sku.append(base_sku[b] + ("HO" if high_output else "HD"))
        title.append(titles[b] + (" High Output" if high_output else " Heavy Duty"))
        variant_group.append(None)
    item_price = price[item_base].copy()
    item_price[specialised] = np.floor(np.minimum(item_price[specialised] * 1.3, 3999)) + 0.99

    # Fitment of items: each item inherits its base product's rows.
    cnt = np.bincount(fb, minlength=n_base)
    ptr = np.r_[0, np.cumsum(cnt)]
    lengths = cnt[item_base]
    rows = _ranges(ptr[item_base], lengths)
    fit_item = np.repeat(np.arange(n_items), lengths)
    fit_veh = fv_sorted[rows]
    # Thin vehicles keep 0-3 fitting parts.
    on_thin = thin_veh[fit_veh] >= 0
    quota = thin_veh[fit_veh[on_thin]]
    rank = _group_rank(fit_veh[on_thin], rng.random(int(on_thin.sum())))
    keep = np.ones(len(fit_veh), bool)
    keep[np.flatnonzero(on_thin)] = rank < quota
    fit_item, fit_veh = fit_item[keep], fit_veh[keep]
    return _Catalogue(sku=_arrow(sku), cls=cls[item_base], ptype=ptype[item_base],
                      brand=brand[item_base], price=item_price, title=title,
                      variant_group=variant_group, specialised=specialised, fit_item=fit_item,
                      fit_veh=fit_veh, n_fit_veh=np.bincount(fit_item, minlength=n_items))


# ----------------------------------------------------------------------------- propensities

def _propensity(spec: WorldSpec, cat: _Catalogue, veh: _Vehicles, seg_veh: np.ndarray,
                seg_users: np.ndarray, rng: np.random.Generator):
    """Ground-truth purchase propensities of every segment (index k: users without vehicle).

    A segment's fitting purchases mix its own favourites (Zipf over a ranking keyed by
    make+model, so neighbouring years agree, that puts vehicle-specific parts first) with
    global popularity restricted to parts that fit (broad parts like the generic headlight
    win there). The mixing weight is solved so that owners' median lift (own top 4 versus
    the global top 4 fitting parts) equals `spec.segment_lift` at every scale. Products
    without fitment rows follow one global distribution, a share `no_fitment_share`."""
    k = len(seg_veh)
    n_items = len(cat.price)
    seg_of_veh = np.full(len(veh.veh_make), -1)
    seg_of_veh[seg_veh] = np.arange(k)
    held = seg_of_veh[cat.fit_veh] >= 0
    order = np.argsort(seg_of_veh[cat.fit_veh[held]], kind="stable")
    seg = seg_of_veh[cat.fit_veh[held]][order]
    item = cat.fit_item[held][order]

    n_fit = cat.n_fit_veh.astype(float)
    g = rng.lognormal(0.0, 1.0, n_items) * np.maximum(n_fit, 1) ** 0.6
    model = veh.veh_model[seg_veh[seg]]
    _, pair = np.unique(model * n_items + item, return_inverse=True)
    gumbel = -np.log(-np.log(rng.uniform(1e-12, 1, int(pair.max(initial=-1)) + 1)))
    key = (gumbel[pair] - 0.8 * np.log(np.maximum(n_fit[item], 1))
           + 0.35 * -np.log(-np.log(rng.uniform(1e-12, 1, len(seg)))))
    own = (_group_rank(seg, key) + 1.0) ** -spec.segment_rank_exponent
    own /= _group_sum(seg, own, k)[seg]
    glob = g[item] / _group_sum(seg, g[item], k)[seg]

    p = spec.no_fitment_share
    fitting = np.flatnonzero(n_fit > 0)
    pseudo_prob = g[fitting] / g[fitting].sum()
    n_entries = np.bincount(seg, minlength=k)
    user_share = seg_users / seg_users.sum()
    fit_mass = np.where(np.r_[n_entries, len(fitting)] > 0, 1 - p, 0.0)
    pseudo_mean = np.bincount(fitting, weights=user_share[k] * fit_mass[k] * pseudo_prob,
                              minlength=n_items)
    entry_weight = user_share[seg] * fit_mass[seg]

    def evaluate(w: float):
        """Fitting-purchase probabilities for weight w and the owners' lift they give."""
        prob = w * own + (1 - w) * glob
        mean_fit = pseudo_mean + np.bincount(item, weights=entry_weight * prob,
                                             minlength=n_items)
        top = np.argsort(-np.where(n_fit > 0, mean_fit, -1.0), kind="stable")[:20]
        rank = _group_rank(seg, prob)
        is_top4 = np.zeros(n_items, bool)
        is_top4[top[:4]] = True
        fav4 = _group_sum(seg, prob * (rank < 4), k)
        glob4 = _group_sum(seg, prob * is_top4[item], k)
        ok = (seg_users[:k] > 0) & (n_entries >= 4) & (glob4 > 0)
        lift = pd.Series(fav4[ok] / glob4[ok], index=np.flatnonzero(ok), name="segment_lift")
        return prob, mean_fit, top, rank, lift

    # Secant search on logit(w): log-lift is close to linear in it.
    target = math.log(spec.segment_lift)
    xs = [math.log(0.6 / 0.4), math.log(0.8 / 0.2)]
    fs = [math.log(evaluate(1 / (1 + math.exp(-x)))[4].median()) - target for x in xs]
    for _ in range(8):
        if abs(fs[-1]) < 0.01 or fs[-1] == fs[-2]:
            break
        x = xs[-1] - fs[-1] * (xs[-1] - xs[-2]) / (fs[-1] - fs[-2])
        xs.append(min(max(x, -4.0), 4.0))
        fs.append(math.log(evaluate(1 / (1 + math.exp(-xs[-1])))[4].median()) - target)
    weight = 1 / (1 + math.exp(-xs[int(np.argmin(np.abs(fs)))]))
    prob, mean_fit, top, rank, lift = evaluate(weight)
    fit = _Categorical.build(np.r_[seg, np.full(len(fitting), k)], np.r_[item, fitting],
                             np.r_[prob, pseudo_prob], k + 1)

    nofit_items = np.flatnonzero(n_fit == 0)
    factor = np.select([cat.cls[nofit_items] == FIT_MISSING, cat.cls[nofit_items] == SERVICE],
                       [0.35, 0.25], 1.0)
    w_nofit = rng.lognormal(0.0, 1.1, len(nofit_items)) * factor
    nofit_prob = np.zeros(n_items)
    nofit_prob[nofit_items] = w_nofit / w_nofit.sum()
    nofit = _Categorical.build(np.zeros(len(nofit_items), np.int64), nofit_items, w_nofit, 1)
    mean_prob = nofit_prob * float((user_share * (1 - fit_mass)).sum()) + mean_fit
    browse = _Categorical.build(np.zeros(n_items, np.int64), np.arange(n_items),
                                mean_prob ** 0.6 + 1e-6, 1)
    prop = _Propensity(fit=fit, nofit=nofit, browse=browse, p_nofit=p)
    return prop, dict(seg=seg, item=item, prob=prob, rank=rank, fit_mass=fit_mass, top=top,
                      lift=lift, mean_prob=mean_prob, weight=weight)


def _truth_tables(cat: _Catalogue, veh: _Vehicles, seg_veh: np.ndarray, seg_users: np.ndarray,
                  detail: dict):
    """Segment table (thin = fewer than 4 fitting parts), each segment's favourite fitting
    parts and the global top fitting parts."""
    k = len(seg_veh)
    sku = np.array(cat.sku.to_pylist(), dtype=object)
    seg, rank = detail["seg"], detail["rank"]
    owner_prob = detail["fit_mass"][seg] * detail["prob"]
    top = rank < 10
    segment_top = pd.DataFrame({"segment_id": seg[top], "rank": rank[top] + 1,
                                "sku": sku[detail["item"][top]], "prob": owner_prob[top]}
                               ).sort_values(["segment_id", "rank"], ignore_index=True)
    g = detail["top"]
    global_top = pd.DataFrame({"rank": np.arange(1, len(g) + 1), "sku": sku[g],
                               "prob": detail["mean_prob"][g]})
    n_fitting = np.bincount(seg, minlength=k)
    segments = pd.DataFrame({
        "segment_id": np.arange(k),
        "make": pd.Series(veh.make_names.take(pa.array(veh.veh_make[seg_veh])), dtype="str"),
        "model": pd.Series(veh.model_names.take(pa.array(veh.veh_model[seg_veh])), dtype="str"),
        "year": veh.veh_year[seg_veh], "n_users": seg_users, "n_fitting": n_fitting,
        "is_thin": n_fitting < 4})
    return segments, segment_top, global_top, sku


# ----------------------------------------------------------------------------- behaviour

def _campaign(spec: WorldSpec, user_ok: np.ndarray, t_send0: int, rng: np.random.Generator):
    """Email campaign: who got which treatment and what happened (times in epoch seconds)."""
    cand = np.flatnonzero(user_ok)
    n_sent = int(round(spec.campaign_share * len(cand)))
    user = np.sort(rng.choice(cand, n_sent, replace=False))
    weights = rng.dirichlet(np.full(spec.n_treatments, 4.0))
    treatment = rng.choice(spec.n_treatments, n_sent, p=weights)
    z = rng.standard_normal(spec.n_treatments)
    z_mean = float(weights @ z)
    ctr = np.clip(spec.ctr_mean + (spec.ctr_best - spec.ctr_mean) * (z - z_mean) /
                  (z.max() - z_mean), 0.01, None)
    sent_t = t_send0 + rng.integers(0, 2 * DAY, n_sent)
    delivered = rng.random(n_sent) < spec.delivered_rate
    deliver_t = sent_t + rng.integers(5, 600, n_sent)
    reason = rng.choice(len(FAILURE_REASONS), n_sent, p=FAILURE_REASON_P)
    viewed = delivered & (rng.random(n_sent) < spec.open_rate / spec.delivered_rate)
    view_t = deliver_t + 60 + rng.exponential(8 * 3600, n_sent).astype(np.int64)
    clicked_view = viewed & (rng.random(n_sent) < ctr[treatment])
    expected_view_clicks = spec.open_rate * float(weights @ ctr)
    unopened_rate = max(0.0, (spec.click_rate - expected_view_clicks)
                        / (spec.delivered_rate - spec.open_rate))
    clicked_blind = delivered & ~viewed & (rng.random(n_sent) < unopened_rate)
    clicked = clicked_view | clicked_blind
    click_t = np.where(viewed, view_t, deliver_t + rng.exponential(8 * 3600, n_sent)
                       .astype(np.int64)) + 10 + rng.exponential(1200, n_sent).astype(np.int64)
    ordered = clicked & (rng.random(n_sent) < spec.order_after_click)
    order_t = click_t + rng.integers(600, 7 * DAY, n_sent)

    parts = [(np.ones(n_sent, bool), sent_t, 0), (delivered, deliver_t, 1),
             (~delivered, deliver_t, 2), (viewed, view_t, 3), (clicked, click_t, 4)]
    ev_user = np.concatenate([user[m] for m, _, _ in parts])
    ev_treat = np.concatenate([treatment[m] for m, _, _ in parts])
    ev_t = np.concatenate([t[m] for m, t, _ in parts])
    ev_kind = np.concatenate([np.full(int(m.sum()), kind) for m, _, kind in parts])
    ev_reason = np.concatenate([np.where(kind == 2, reason[m], -1) for m, _, kind in parts])
    order = np.lexsort((ev_kind, ev_t))
    events = dict(user=ev_user[order], treatment=ev_treat[order], t=ev_t[order],
                  kind=ev_kind[order], reason=ev_reason[order])
    names = [f"T{i + 1:02d}" for i in range(spec.n_treatments)]
    truth = dict(ctr=dict(zip(names, ctr.round(6).tolist())),
                 weights=dict(zip(names, weights.round(6).tolist())),
                 unopened_rate=unopened_rate)
    stats = dict(sent=n_sent, delivered=int(delivered.sum()), viewed=int(viewed.sum()),
                 clicked=int(clicked.sum()), delivery_failed=int((~delivered).sum()))
    return events, user[ordered], order_t[ordered], truth, stats


def _orders(spec: WorldSpec, seg_of_user: np.ndarray, prop: _Propensity, t0: int, t2: int,
            extra_user: np.ndarray, extra_t: np.ndarray, rng: np.random.Generator):
    """Order lines: gamma-Poisson order counts per user (tuned to the repeat rate), 1-3
    distinct SKUs per order from the user's segment propensities, plus campaign orders."""
    n_users = len(seg_of_user)
    days = (t2 - t0) / DAY
    mean = spec.orders_per_user
    shape = _solve_gamma_shape(mean, spec.repeat_rate)
    rate = rng.gamma(shape, mean / shape / spec.history_days, n_users)  # orders per day
    n_orders = rng.poisson(rate * days)
    o_user = np.r_[np.repeat(np.arange(n_users), n_orders), extra_user]
    o_t = np.r_[rng.integers(t0, t2, int(n_orders.sum())), extra_t]
    keep = o_t < t2
    o_user, o_t = o_user[keep], o_t[keep]
    n_lines = 1 + (rng.random(len(o_user)) < 0.35) + (rng.random(len(o_user)) < 0.10)
    order_no = np.repeat(np.arange(len(o_user)), n_lines)
    l_user = o_user[order_no]
    l_item = prop.purchase(rng, seg_of_user[l_user])
    _, first = np.unique(order_no * (len(prop.browse.value) + 1) + l_item, return_index=True)
    first = np.sort(first)
    return order_no[first], l_user[first], o_t[order_no[first]], l_item[first], rate


def _events(spec: WorldSpec, seg_of_user: np.ndarray, prop: _Propensity, cat: _Catalogue,
            t0: int, t2: int, campaign_orders, rng: np.random.Generator):
    """All behavioural events of history and holdout, sorted by time, as index arrays.

    Intent precedes purchases: 60% of order lines follow 1+ views of the same SKU in the
    previous weeks and 35% follow a cart update; browsing adds views (and a few abandoned
    carts) drawn from the same propensities."""
    order_no, l_user, l_t, l_item, rate = _orders(spec, seg_of_user, prop, t0, t2,
                                                  *campaign_orders, rng)
    n_lines = len(l_item)
    price = cat.price[l_item]
    wheel = cat.ptype[l_item] == [t[0] for t in PART_TYPES].index("Wheel")
    qty = np.where(price < 30, 1 + np.minimum(rng.poisson(1.0, n_lines), 5),
                   np.where(rng.random(n_lines) < 0.04, 2, 1))
    qty = np.where(wheel & (rng.random(n_lines) < 0.5), 4, qty)

    n_views = np.where(rng.random(n_lines) < 0.6, 1 + rng.poisson(0.7, n_lines), 0)
    v_line = np.repeat(np.arange(n_lines), n_views)
    v_t = l_t[v_line] - 60 - rng.exponential(3 * DAY, len(v_line)).astype(np.int64)
    c_line = np.flatnonzero(rng.random(n_lines) < 0.35)
    c_t = l_t[c_line] - 30 - rng.exponential(3 * 3600, len(c_line)).astype(np.int64)

    mean_rate = max(float(rate.mean()), 1e-12)
    browse_rate = (spec.views_per_user / spec.history_days
                   * (0.5 * rate / mean_rate + 0.5 * rng.gamma(0.6, 1 / 0.6, len(rate))))
    n_browse = rng.poisson(browse_rate * (t2 - t0) / DAY)
    b_user = np.repeat(np.arange(len(rate)), n_browse)
    b_t = rng.integers(t0, t2, len(b_user))
    b_item = prop.view(rng, seg_of_user[b_user])
    a_idx = np.flatnonzero(rng.random(len(b_user)) < 0.04)
    a_t = b_t[a_idx] + rng.integers(30, 1800, len(a_idx))

    user = np.concatenate([np.repeat(l_user, 3), l_user[v_line], l_user[c_line], b_user,
                           b_user[a_idx]])
    item = np.concatenate([np.repeat(l_item, 3), l_item[v_line], l_item[c_line], b_item,
                           b_item[a_idx]])
    t = np.concatenate([np.repeat(l_t, 3), v_t, c_t, b_t, a_t])
    name = np.concatenate([np.tile([2, 3, 4], n_lines), np.zeros(len(v_line), np.int64),
                           np.ones(len(c_line), np.int64), np.zeros(len(b_user), np.int64),
                           np.ones(len(a_idx), np.int64)])
    quantity = np.concatenate([np.repeat(qty, 3), np.ones(len(v_line), np.int64), qty[c_line],
                               np.ones(len(b_user) + len(a_idx), np.int64)])
    order = np.concatenate([np.repeat(order_no, 3),
                            np.full(len(v_line) + len(c_line) + len(b_user) + len(a_idx), -1)])
    keep = (t >= t0) & (t < t2)
    sort = np.flatnonzero(keep)[np.lexsort((name[keep], t[keep]))]
    # Order numbers follow time, as a shop's would.
    order_sorted = order[sort]
    placed, first_pos = np.unique(order_sorted[name[sort] == 2], return_index=True)
    o_rank = np.full(int(order_no.max(initial=-1)) + 1, -1)
    o_rank[placed[np.argsort(first_pos)]] = np.arange(len(placed))
    return dict(user=user[sort], item=item[sort], t=t[sort], name=name[sort],
                quantity=quantity[sort],
                order=np.where(order_sorted >= 0, o_rank[np.maximum(order_sorted, 0)], -1))


def _event_frame(ev: dict, idx: np.ndarray, event_no: np.ndarray, user_ids: pa.Array,
                 cat: _Catalogue) -> pd.DataFrame:
    """Events table for the given rows of the sorted event arrays."""
    order = ev["order"][idx]
    return pd.DataFrame({
        "event_id": _ids("E", event_no[idx], 10),
        "event_time": _rfc3339(ev["t"][idx]),
        "user_id": _take(user_ids, ev["user"][idx]),
        "event_name": _take(_arrow(EVENT_NAMES), ev["name"][idx]),
        "sku": _take(cat.sku, ev["item"][idx]),
        "quantity": ev["quantity"][idx].astype(np.int64),
        "price": cat.price[ev["item"][idx]],
        "order_id": _ids("O", np.maximum(order, 0) + 1, 9, null=order < 0),
    })


def _with_duplicates(n: int, share: float, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """Row order with ~share of rows redelivered right after themselves."""
    n_dup = int(round(share * n))
    rows = np.sort(np.r_[np.arange(n), rng.choice(n, n_dup, replace=False)], kind="stable")
    return rows, n_dup


# ----------------------------------------------------------------------------- generate

def generate(spec: WorldSpec, seed: int) -> World:
    """Build a world deterministically from (spec, seed)."""
    r_veh, r_users, r_cat, r_prop, r_camp, r_events, r_frames = \
        np.random.default_rng(seed).spawn(7)
    t1 = _epoch(spec.history_end)
    t0 = t1 - spec.history_days * DAY
    t2 = t1 + spec.holdout_days * DAY

    veh = _vehicles(spec, r_veh)
    seg_veh, seg_share = _segments(spec, veh, r_veh)
    k = len(seg_veh)
    n = spec.n_users
    seg_of_user = r_users.choice(k, n, p=seg_share)
    no_vehicle = r_users.random(n) < spec.null_vehicle_share
    seg_of_user[no_vehicle] = k
    seg_users = np.bincount(seg_of_user, minlength=k + 1)[:k]
    held = np.flatnonzero(seg_users > 0)
    n_thin = max(3, int(round(spec.thin_vehicle_share * len(held))))
    tail = held[np.argsort(seg_users[held], kind="stable")][:3 * n_thin]
    thin_seg = np.sort(r_users.choice(tail, min(n_thin, len(tail)), replace=False))
    thin_veh = np.full(len(veh.veh_make), -1)
    thin_veh[seg_veh[thin_seg]] = r_users.integers(0, 4, len(thin_seg))

    cat = _catalogue(spec, veh, thin_veh, r_cat)
    prop, detail = _propensity(spec, cat, veh, seg_veh, np.r_[seg_users, no_vehicle.sum()],
                               r_prop)
    segments, segment_top, global_top, sku_list = _truth_tables(
        cat, veh, seg_veh, seg_users, detail)
    thin = np.flatnonzero(segments["is_thin"].to_numpy() & (seg_users > 0))

    camp_ev, camp_user, camp_t, camp_truth, camp_stats = _campaign(
        spec, ~no_vehicle, t1 - 35 * DAY, r_camp)
    ev = _events(spec, seg_of_user, prop, cat, t0, t2, (camp_user, camp_t), r_events)

    # Tables.
    user_ids = _ids("U", np.arange(1, n + 1), 7)
    user_ids_arrow = pa.array(user_ids)
    emails, email_info = _emails(spec, n, r_users)
    seg_idx = np.minimum(seg_of_user, k - 1)
    updated = t1 - r_users.integers(DAY, 3 * 365 * DAY, n)
    dup = email_info["duplicate"]
    same = updated[dup] == updated[email_info["source"]]
    updated[dup[same]] -= DAY
    users = pd.DataFrame({
        "user_id": user_ids,
        "email": pd.Series(emails, dtype="str"),
        "make": _take(veh.make_names, veh.veh_make[seg_veh[seg_idx]], null=no_vehicle),
        "model": _take(veh.model_names, veh.veh_model[seg_veh[seg_idx]], null=no_vehicle),
        "year": pd.arrays.IntegerArray(veh.veh_year[seg_veh[seg_idx]].astype(np.int64),
                                       no_vehicle),
        "updated_at": _rfc3339(updated),
    })

    catalog, conflicting, catalog_stats = _catalog_frame(spec, cat, detail["mean_prob"],
                                                        len(veh.veh_make), r_frames)
    fitment = pd.DataFrame({
        "sku": _take(cat.sku, cat.fit_item),
        "make": _take(veh.make_names, veh.veh_make[cat.fit_veh]),
        "model": _take(veh.model_names, veh.veh_model[cat.fit_veh]),
        "year": veh.veh_year[cat.fit_veh].astype(np.int64),
    })

    event_no = np.arange(1, len(ev["t"]) + 1)
    in_history = ev["t"] < t1
    hist_rows, hist_dup = _with_duplicates(int(in_history.sum()), spec.duplicate_event_share,
                                           r_frames)
    hold_rows, hold_dup = _with_duplicates(int((~in_history).sum()),
                                           spec.duplicate_event_share, r_frames)
    hist_idx = np.flatnonzero(in_history)[hist_rows]
    hold_idx = np.flatnonzero(~in_history)[hold_rows]
    events = _event_frame(ev, hist_idx, event_no, user_ids_arrow, cat)
    holdout = _event_frame(ev, hold_idx, event_no, user_ids_arrow, cat)

    treatment = pd.DataFrame({
        "event_id": _ids("TE", np.arange(1, len(camp_ev["t"]) + 1), 9),
        "event_time": _rfc3339(camp_ev["t"]),
        "user_id": _take(user_ids_arrow, camp_ev["user"]),
        "treatment_id": _take(_arrow(camp_truth["ctr"]), camp_ev["treatment"]),
        "campaign_id": _take(_arrow([spec.campaign_id]), np.zeros(len(camp_ev["t"]), np.int64)),
        "kind": _take(_arrow(TREATMENT_KINDS), camp_ev["kind"]),
        "reason": _take(_arrow(FAILURE_REASONS), np.maximum(camp_ev["reason"], 0),
                        null=camp_ev["reason"] < 0),
    })

    placed = in_history & (ev["name"] == 2)
    stride = int(ev["order"].max(initial=0)) + 1
    user_orders = np.unique(ev["user"][placed] * stride + ev["order"][placed]) // stride
    orders_per_buyer = np.unique(user_orders, return_counts=True)[1]
    no_fit_share = float((cat.n_fit_veh[ev["item"][placed]] == 0).mean()) if placed.any() else 0.0
    truth = GroundTruth(
        segments=segments, segment_top=segment_top, global_top=global_top,
        segment_lift=detail["lift"], segment_weight=detail["weight"],
        purchase_prob=detail["mean_prob"], skus=sku_list,
        no_fitment_share=spec.no_fitment_share, treatment_ctr=camp_truth["ctr"],
        treatment_weights=camp_truth["weights"], unopened_click_rate=camp_truth["unopened_rate"],
        campaign_orders=int(len(camp_user)), conflicting_skus=conflicting,
        thin_segments=list(zip(segments["make"][thin], segments["model"][thin],
                               segments["year"][thin].tolist())))
    manifest = {
        "preset": spec.name, "seed": seed, "format": None,
        "as_of": events["event_time"].max() if len(events) else _iso(t1 - 1),
        "history_start": _iso(t0), "holdout_start": _iso(t1), "holdout_end": _iso(t2),
        "history_days": spec.history_days, "holdout_days": spec.holdout_days,
        "row_counts": {"catalog": len(catalog), "fitment": len(fitment), "users": len(users),
                       "events": len(events), "holdout_events": len(holdout),
                       "treatment_events": len(treatment)},
        "conflicting_catalog_skus": len(conflicting),
        "duplicate_event_ids": hist_dup,
        "holdout_duplicate_event_ids": hold_dup,
        "duplicate_emails": int(len(dup)),
        "mixed_case_emails": email_info["mixed"],
        "null_vehicle_users": int(no_vehicle.sum()),
        "thin_vehicles": int(len(thin)),
        "thin_vehicle_users": int(seg_users[thin].sum()),
        **catalog_stats,
        "bad_rows_by_kind": {},
        "stats": {
            "vehicles": int(len(veh.veh_make)),
            "distinct_segments": int(len(held)),
            "orders": int(orders_per_buyer.sum()),
            "repeat_purchase_rate": round(float((orders_per_buyer >= 2).mean()), 4)
            if len(orders_per_buyer) else 0.0,
            "no_fitment_purchase_share": round(no_fit_share, 4),
            "median_segment_lift": round(float(detail["lift"].median()), 3),
            "campaign": {"campaign_id": spec.campaign_id, **camp_stats,
                         "click_orders": int(len(camp_user))},
        },
    }
    return World(spec=spec, seed=seed, catalog=catalog, fitment=fitment, users=users,
                 events=events, holdout_events=holdout, treatment_events=treatment,
                 manifest=manifest, truth=truth)


def _catalog_frame(spec: WorldSpec, cat: _Catalogue, mean_prob: np.ndarray, n_vehicles: int,
                   rng: np.random.Generator) -> Tuple[pd.DataFrame, List[str], dict]:
    """Catalogue rows sorted by SKU, with the conflicting duplicate rows planted among them."""
    n = len(cat.price)
    all_types = [t[0] for t in PART_TYPES] + [t[0] for t in SERVICE_TYPES]
    sku = np.array(cat.sku.to_pylist(), dtype=object)
    service = cat.cls == SERVICE
    refurbished = ~service & (rng.random(n) < spec.refurbished_share)
    http = rng.random(n) < spec.http_image_share
    universal = np.isin(cat.cls, (UNIVERSAL, UNIVERSAL_BROAD, SERVICE))
    tags = []
    for i in range(n):
        name = all_types[cat.ptype[i]]
        row = ["service"] if service[i] else ["universal" if universal[i] else "vehicle-specific"]
        if name in PERFORMANCE_TYPES:
            row.append("performance")
        if refurbished[i]:
            row.append("refurbished")
        tags.append(row)
    # Conflicts hit popular, otherwise eligible vehicle parts, as in the field.
    eligible = (np.isin(cat.cls, (SPECIFIC, MAKE_BROAD)) & (cat.price >= 50) & ~refurbished
                & ~http & (cat.n_fit_veh > 0))
    pool = np.flatnonzero(eligible)
    pool = pool[np.argsort(-mean_prob[pool], kind="stable")][:max(50, len(pool) // 20)]
    conflict = np.sort(rng.choice(pool, min(spec.conflicting_skus, len(pool)), replace=False))
    fit_types = np.array([i for i, t in enumerate(PART_TYPES) if t[5][0] > 0])
    own = np.searchsorted(fit_types, cat.ptype[conflict])
    alt = fit_types[(own + rng.integers(1, len(fit_types), len(conflict))) % len(fit_types)]

    order = np.argsort(sku, kind="stable")
    positions = rng.integers(0, n + 1, len(conflict))
    rows = np.insert(order, positions, conflict)
    is_dup = np.insert(np.zeros(n, bool), positions, True)
    alt_of_item = np.full(n, -1)
    alt_of_item[conflict] = alt
    ptype_names = np.array(all_types, dtype=object)
    part_type = ptype_names[cat.ptype[rows]]
    part_type[is_dup] = ptype_names[alt_of_item[rows[is_dup]]]
    brands = np.array([b for b, _ in BRANDS], dtype=object)
    image = np.array([f"{'http' if http[i] else 'https'}://img.partsworld.example/p/{sku[i]}.jpg"
                      for i in range(n)], dtype=object)
    variant = np.array(cat.variant_group, dtype=object)
    frame = pd.DataFrame({
        "sku": pd.Series(sku[rows], dtype="str"),
        "title": pd.Series(np.array(cat.title, dtype=object)[rows], dtype="str"),
        "part_type": pd.Series(part_type, dtype="str"),
        "brand": pd.Series(brands[cat.brand[rows]], dtype="str"),
        "price": cat.price[rows],
        "image_url": pd.Series(image[rows], dtype="str"),
        "tags": pd.Series([tags[i] for i in rows], dtype=object),
        "is_universal": universal[rows],
        "variant_group": pd.Series(variant[rows], dtype="str"),
    })
    stats = {
        "catalog_skus": int(n),
        "universal_skus": int(universal.sum()),
        "service_skus": int(service.sum()),
        "refurbished_skus": int(refurbished.sum()),
        "http_image_urls": int(http.sum()),
        "variant_groups": int(len({g for g in cat.variant_group if g})),
        "variant_skus": int(sum(g is not None for g in cat.variant_group)),
        "specialised_variants": int(cat.specialised.sum()),
        "skus_by_class": {name: int((cat.cls == c).sum()) for c, name in enumerate(CLASS_NAMES)},
        "no_fitment_skus": int((cat.n_fit_veh == 0).sum()),
        "broad_fit_skus": int((cat.n_fit_veh >= 0.5 * n_vehicles).sum()),
    }
    return frame, sku[conflict].tolist(), stats


# ----------------------------------------------------------------------------- writing

def _py_column(column: pd.Series) -> list:
    """A column as Python values, None where missing (orjson writes null)."""
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "Ofbiu":
        return column.tolist()
    return column.astype(object).where(column.notna(), None).tolist()


def _records(frame: pd.DataFrame) -> List[dict]:
    """Rows of a frame as dicts of Python values."""
    columns = list(frame.columns)
    return [dict(zip(columns, row)) for row in zip(*(_py_column(frame[c]) for c in columns))]


def _bad_records(table: str, frame: pd.DataFrame, kinds: Tuple[str, ...], n: int, fmt: str,
                 rng: np.random.Generator) -> List[Tuple[str, object]]:
    """n bad rows of each kind, made from copies of real rows: (kind, dict or raw line).

    Rows that stay parseable get fresh keys so they never collide with real rows."""
    base = _records(frame.iloc[rng.integers(0, len(frame), n * len(kinds))])
    out: List[Tuple[str, object]] = []
    key = {"events": "event_id", "users": "user_id", "catalog": "sku"}.get(table)
    for i, row in enumerate(base):
        kind = kinds[i // n]
        if key:
            width = 9 if table == "events" else (6 if table == "users" else 4)
            row[key] = f"{BAD_ID_PREFIX[table]}{i + 1:0{width}d}"
        if kind == "malformed_json":
            out.append((kind, orjson.dumps(row)[:-1] + b",}"))
        elif kind == "truncated_line":
            line = orjson.dumps(row)
            out.append((kind, line[:len(line) // 2]))
        elif kind == "missing_field":
            field = MISSING_FIELDS[table][i % len(MISSING_FIELDS[table])]
            if fmt == "jsonl":
                del row[field]
            else:
                row[field] = None
            out.append((kind, row))
        elif kind == "unknown_event_name":
            out.append((kind, {**row, "event_name": UNKNOWN_EVENT_NAMES[i % 3]}))
        elif kind == "negative_price":
            out.append((kind, {**row, "price": -abs(row["price"] or 1.0)}))
        elif kind == "nan_price":
            if fmt == "jsonl":
                # orjson writes NaN as null; the feed's bug is the literal, non-standard NaN.
                out.append((kind, orjson.dumps({**row, "price": "__NaN__"})
                            .replace(b'"__NaN__"', b"NaN")))
            else:
                out.append((kind, {**row, "price": float("nan")}))
        elif kind == "unknown_sku":
            out.append((kind, {**row, "sku": f"{UNKNOWN_SKU_PREFIX}{i + 1:04d}"}))
    return out


def _write_jsonl(path: str, frame: pd.DataFrame, bad: List[Tuple[str, object]],
                 rng: np.random.Generator, chunk: int = 20_000) -> int:
    """Write JSON Lines with the bad rows at random positions; returns lines written.

    Rows are serialised in chunks so memory stays small and is reused."""
    dumps = orjson.dumps
    n = len(frame)
    positions = np.sort(rng.integers(0, n + 1, len(bad)))
    bad_lines = [p if isinstance(p, bytes) else dumps(p) for _, p in bad]
    j = 0
    with open(path, "wb") as f:
        for start in range(0, n, chunk):
            lines = [dumps(row) for row in _records(frame.iloc[start:start + chunk])]
            stop = start + len(lines)
            planted = 0
            while j < len(bad_lines) and positions[j] < stop:
                lines.insert(int(positions[j]) - start + planted, bad_lines[j])
                planted += 1
                j += 1
            f.write(b"\n".join(lines) + b"\n")
        if j < len(bad_lines):
            f.write(b"\n".join(bad_lines[j:]) + b"\n")
    return n + len(bad_lines)


def _write_parquet(path: str, table: str, frame: pd.DataFrame, bad: List[Tuple[str, object]],
                   rng: np.random.Generator) -> int:
    """Write Parquet with the contract's types and bad rows at random positions."""
    schema = ARROW_SCHEMAS[table]
    data = pa.Table.from_pandas(frame, preserve_index=False).select(schema.names).cast(schema)
    if bad:
        extra = pa.Table.from_pylist([row for _, row in bad], schema=schema)
        n = data.num_rows
        order = np.insert(np.arange(n), rng.integers(0, n + 1, len(bad)),
                          n + np.arange(len(bad)))
        data = pa.concat_tables([data, extra]).take(pa.array(order))
    pq.write_table(data, path, compression="snappy")
    return data.num_rows


def write_world(world: World, out_dir: str, fmt: str = "jsonl", bad_rows: int = 0) -> dict:
    """Write every table as `<table>.<fmt>` plus `world.json`; returns the written manifest.

    With bad_rows = N, N rows of each bad kind are planted in events, users, catalog and
    fitment (Parquet holds only the row-level kinds) and counted in the manifest."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"format must be jsonl or parquet, not {fmt!r}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng([world.seed, 7919])
    bad_by_kind: Dict[str, Dict[str, int]] = {}
    written: Dict[str, int] = {}
    for table, frame in world.tables().items():
        kinds = tuple(k for k in BAD_KINDS.get(table, ())
                      if fmt == "jsonl" or k not in TEXT_ONLY_KINDS)
        bad = _bad_records(table, frame, kinds, bad_rows, fmt, rng) if bad_rows > 0 and kinds \
            and len(frame) else []
        if bad:
            bad_by_kind[table] = {k: bad_rows for k in kinds}
        path = os.path.join(out_dir, f"{table}.{fmt}")
        if fmt == "jsonl":
            written[table] = _write_jsonl(path, frame, bad, rng)
        else:
            written[table] = _write_parquet(path, table, frame, bad, rng)
    manifest = {**world.manifest, "format": fmt, "bad_rows_by_kind": bad_by_kind,
                "bad_rows_total": int(sum(sum(v.values()) for v in bad_by_kind.values())),
                "written_rows": written}
    with open(os.path.join(out_dir, "world.json"), "wb") as f:
        f.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest
