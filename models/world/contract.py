"""What a generated world writes: table and event names, the Arrow schemas of the
contract, and the bad-row kinds planted in written files (SPEC §2, §6)."""
from __future__ import annotations

from typing import Dict, Tuple

import pyarrow as pa

EVENT_NAMES = ("Viewed Product", "Cart Update", "Placed Order", "Ordered Product",
               "Consumer Website Order")
TREATMENT_KINDS = ("SENT", "DELIVERED", "DELIVERY_FAILED", "VIEWED", "CLICKED")
FAILURE_REASONS = ("mailbox_full", "invalid_address", "blocked")
FAILURE_REASON_P = (0.30, 0.45, 0.25)
TABLES = ("catalog", "fitment", "users", "events", "holdout_events", "treatment_events")
DAY = 86_400
# The allocation_version a generated world's SENT events record: their logging policy is the
# world's fixed treatment weights (GroundTruth.treatment_weights).
ALLOCATION_VERSION = "world-fixed"

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
                                   ("reason", _STRING), ("propensity", pa.float64()),
                                   ("allocation_version", _STRING)]),
}
ARROW_SCHEMAS["holdout_events"] = ARROW_SCHEMAS["events"]
