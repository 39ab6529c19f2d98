"""Seeded synthetic world of an automotive performance-parts retailer (SPEC §1-5).

`generate` builds the catalogue, fitment, users, behavioural events (plus a
later holdout period for backtests) and email-treatment events, with the field
statistics of SPEC.md and the anomalies real feeds carry; `World.truth` keeps
the propensities that produced them, so tests and backtests can check results
against a known answer. Columns are built with numpy/pyarrow, never per row,
so the full preset (500,000 users, ~2 million events) takes seconds.

The package's modules, in the order a world is built: `contract` (table names,
Arrow schemas, bad-row kinds), `vocabulary` (makes, brands, part types),
`spec` (`WorldSpec`, `GroundTruth`, `World`), `arrays` (vectorised helpers),
`users` (vehicles, segments, e-mails), `catalogue` (products and fitment),
`propensity` (who buys what), `behaviour` (campaign, orders, events),
`automotive` (its `generate`), `wholesale` (a repeat-buyer B2B world, SPEC §8),
`presets` (`preset(name)` and the `generate` that dispatches on the spec) and
`writer` (`write_world`). Everything is
re-exported here, so `from models.world import ...` is the one import.
"""
from models.world.arrays import (_arrow, _Categorical, _digits, _epoch,  # noqa: F401
                                 _fixed_strings, _group_rank, _group_sum, _ids, _iso, _ranges,
                                 _rfc3339, _take)
from models.world.behaviour import (_campaign, _event_frame, _events, _orders,  # noqa: F401
                                    _with_duplicates)
from models.world.catalogue import (_base_fitment, _catalog_frame, _Catalogue,  # noqa: F401
                                    _catalogue, _counts, _cover_then_draw)
from models.world.contract import (ALLOCATION_VERSION, ARROW_SCHEMAS, BAD_ID_PREFIX,  # noqa: F401
                                   BAD_KINDS, DAY,
                                   EVENT_NAMES, FAILURE_REASON_P, FAILURE_REASONS,
                                   MISSING_FIELDS, TABLES, TEXT_ONLY_KINDS, TREATMENT_KINDS,
                                   UNKNOWN_EVENT_NAMES, UNKNOWN_SKU_PREFIX)
from models.world.presets import (AUTOMOTIVE_PRESETS, PRESETS,  # noqa: F401
                                  WHOLESALE_PRESETS, generate, preset)
from models.world.propensity import _Propensity, _propensity, _truth_tables  # noqa: F401
from models.world.spec import GroundTruth, World, WorldSpec  # noqa: F401
from models.world.users import (_emails, _segments, _solve_gamma_shape, _Vehicles,  # noqa: F401
                                _vehicles)
from models.world.vocabulary import (BRANDS, CLASS_NAMES, COLOURS,  # noqa: F401
                                     CURRENT_MODEL_YEAR, EMAIL_DOMAIN_P, EMAIL_DOMAINS,
                                     FIRST_NAMES, FIT_MISSING, LAST_NAMES, LOW_VALUE_EXCEPTIONS,
                                     LOW_VALUE_TYPES, MAKE_BROAD, MAKES, PART_TYPES,
                                     PERFORMANCE_TYPES, SERVICE, SERVICE_TYPES, SPECIFIC,
                                     UNIVERSAL, UNIVERSAL_ADJECTIVES, UNIVERSAL_BROAD)
from models.world.wholesale import (WholesaleSpec, WholesaleTruth,  # noqa: F401
                                    generate_wholesale)
from models.world.writer import (_bad_records, _py_column, _records,  # noqa: F401
                                 _write_jsonl, _write_parquet, write_world)
