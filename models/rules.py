"""QA checks: the 14 business rules of SPEC §3 counted on the output (plus low-value types).

Each check re-derives its answer from the published rows and the raw
context (catalogue, fitment, purchases, popularity) instead of trusting the
selection code, so a bug in selection shows up as a violation, and publishing
is gated on the total.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models.catalog import https_mask, low_value_mask, service_sku_mask
from models.config import REPURCHASE_SOURCES, RecsConfig
from models.contracts import is_email
from models.popularity import PopularityIndex, segment_keys
from models.recommend import NO_LEVEL, POPULARITY as POPULARITY_SOURCE


class Rule(NamedTuple):
    id: int
    name: str


RULES: Tuple[Rule, ...] = (
    Rule(1, "price at least the floor"),
    Rule(2, "exactly {n} recommendations per user"),
    Rule(3, "at most {k} SKUs of one part type"),
    Rule(4, "nothing bought in the exclusion window"),
    Rule(5, "nothing tagged refurbished"),
    Rule(6, "no service SKUs"),
    Rule(7, "image URL is https"),
    Rule(8, "every SKU fits the vehicle or is universal"),
    Rule(9, "no duplicate SKU or variant group"),
    Rule(10, "scores non-increasing"),
    Rule(11, "scores within the formula's range"),
    Rule(12, "thin segments fall back"),
    Rule(13, "emails lowercased"),
    Rule(14, "one row per email"),
    Rule(15, "no low-value part types"),
)

# Checks of the slot kinds (#14), counted and listed only when the mix fills slots from more
# than segment popularity (the output then names each slot's source, ``recN_source``).
SLOT_RULES: Tuple[Rule, ...] = (
    Rule(16, "repurchase slots hold SKUs the user bought"),
)


def rules_for(config: RecsConfig) -> Tuple[Rule, ...]:
    """The QA rules of a run: the SPEC's, plus the slot-kind checks when a mix is configured."""
    return RULES if config.candidates.popularity_only else RULES + SLOT_RULES


@dataclass
class QAContext:
    """What the checks need beyond the rows: canonical catalogue and each user's facts.

    Attributes:
      catalog: resolved catalogue indexed by ``sku``.
      fitting: vehicle segment key → SKUs that fit it.
      bought: user_id → SKUs bought inside the exclusion window.
      popularity: segment popularity over ``catalog_skus`` positions (rule 12).
      catalog_skus: the sorted SKU array the popularity positions refer to.
      eligible_skus: SKUs that pass the catalogue rules (rule 12 counts only those).
      purchased: user_id → every SKU bought up to ``as_of`` (rule 16; a mix only).
    """

    catalog: pd.DataFrame
    fitting: Mapping[str, frozenset]
    bought: Mapping[str, Sequence[str]]
    popularity: PopularityIndex
    catalog_skus: np.ndarray
    eligible_skus: frozenset
    purchased: Optional[Mapping[str, Sequence[str]]] = None


def _numbers(values: pd.Series) -> np.ndarray:
    """Floats, with anything that is not a number as NaN (which rule 11 then counts)."""
    return pd.to_numeric(values, errors="coerce").to_numpy(float)


def _long(recs: pd.DataFrame, n: int) -> pd.DataFrame:
    """One row per (user, position) with the SKU, score, price, image and part type."""
    parts = []
    for i in range(1, n + 1):
        parts.append(pd.DataFrame({
            "row": np.arange(len(recs)), "pos": i,
            "user_id": recs["user_id"].to_numpy(object),
            "sku": recs[f"rec_part_{i}"].to_numpy(object),
            "score": _numbers(recs[f"rec{i}_score"]),
            "image_url": recs[f"rec{i}_image_url"].to_numpy(object),
            "part_type": recs[f"rec{i}_part_type"].to_numpy(object),
            "slot_source": (recs[f"rec{i}_source"].to_numpy(object)
                            if f"rec{i}_source" in recs.columns else POPULARITY_SOURCE),
        }))
    return pd.concat(parts, ignore_index=True)


def check(recs: pd.DataFrame, ctx: QAContext, config: RecsConfig) -> Dict[int, int]:
    """Violations per rule id on a batch of recommendation rows.

    Rule 14 counts duplicates within the batch; route rows so that one e-mail
    always lands in one batch (the pipeline shards by e-mail) to make it global.
    """
    rules, n = config.rules, config.rules.recs_per_user
    mixed = f"rec{n}_source" in recs.columns
    counts = {rule.id: 0 for rule in (RULES + SLOT_RULES if mixed else RULES)}
    if recs.empty:
        return counts
    long = _long(recs, n)
    # Slot kinds come from the output's own recN_source columns: rule 4 holds on discovery
    # slots, and a repurchase slot must hold something the user bought (rule 16).
    repurchase = long["slot_source"].isin(list(REPURCHASE_SOURCES)).to_numpy(bool)
    # A missing or unknown SKU is a rule-2 violation only; rules that read the
    # catalogue skip it instead of blaming its absent price, type or fitment.
    known = ctx.catalog.index.get_indexer(long["sku"]) >= 0
    cat = ctx.catalog.reindex(long["sku"].where(known, None))
    price, tags = cat["price"].to_numpy(float), cat["tags"].to_numpy(object)

    def per_row(mask) -> int:
        return int(pd.Series(np.asarray(mask, bool)).groupby(long["row"]).any().sum())

    counts[1] = per_row(known & ~(price >= rules.min_price))
    counts[2] = per_row(long["sku"].isna().to_numpy(bool) | ~known)
    types = cat["part_type"].to_numpy(object)
    mismatch = known & (types != long["part_type"].to_numpy(object))
    over = (pd.DataFrame({"row": long["row"], "t": types}).groupby(["row", "t"]).size()
            > rules.max_per_part_type).groupby(level=0).any()
    counts[3] = int((over | pd.Series(mismatch).groupby(long["row"]).any()).sum())
    counts[4] = per_row(~repurchase & _pairs_in(long["user_id"], long["sku"], ctx.bought))
    if mixed:
        ever = _pairs_in(long["user_id"], long["sku"], ctx.purchased or {})
        counts[16] = per_row(repurchase & ~ever)
    excluded = set(rules.excluded_tags)
    counts[5] = per_row([bool(excluded.intersection(t)) if isinstance(t, tuple) else False
                         for t in tags])
    counts[6] = per_row(service_sku_mask(long["sku"], rules))
    counts[7] = per_row(~https_mask(long["image_url"]))
    vehicle = segment_keys(recs, config.fitment_attributes).to_numpy(object)[
        long["row"].to_numpy()]
    # Without fitment attributes every item fits every user.
    universal = (cat["is_universal"].fillna(False).to_numpy(bool)
                 | (not config.fitment_attributes))
    fits = _pairs_in(pd.Series(vehicle), long["sku"], ctx.fitting)
    counts[8] = per_row(known & ~universal & ~fits)
    group = np.where(cat["variant_group"].notna().to_numpy(bool),
                     cat["variant_group"].to_numpy(object), long["sku"].to_numpy(object))
    dup = pd.DataFrame({"row": long["row"], "g": group, "s": long["sku"]}).loc[known]
    counts[9] = per_row(pd.Series(dup.duplicated(["row", "g"]) | dup.duplicated(["row", "s"]))
                        .reindex(long.index, fill_value=False))
    score = np.column_stack([_numbers(recs[f"rec{i}_score"]) for i in range(1, n + 1)])
    # With a mix each slot carries its own source's score: order and range are checked
    # within a source (consecutive slots of one source never rise; popularity's scores stay
    # within its formula, every other source's are finite and >= 0).
    kind = np.column_stack([long["slot_source"].to_numpy(object)[long["pos"] == i]
                            for i in range(1, n + 1)])
    same = kind[:, 1:] == kind[:, :-1]
    counts[10] = int(((np.diff(score, axis=1) > 1e-12) & same).any(axis=1).sum())
    ceiling = np.where(kind == POPULARITY_SOURCE, config.scoring.max_score + 1e-9, np.inf)
    counts[11] = int((~np.isfinite(score) | (score < 0) | (score > ceiling)).any(axis=1).sum())
    counts[12] = _thin_segments_served(recs, ctx, config)
    email = recs["email_lower"].astype(object)
    # The parsers' own addr-spec check, so QA cannot pass what validation would refuse.
    counts[13] = int((~email.map(lambda e: is_email(e) and e == e.lower())).sum())
    counts[14] = duplicate_emails(email)
    counts[15] = per_row(low_value_mask(pd.Series(types), rules))
    return counts


def _pairs_in(keys: pd.Series, skus: pd.Series, sets: Mapping[object, Sequence[str]]
              ) -> np.ndarray:
    """Whether each (key, sku) pair is listed in ``sets[key]``, by one hash join."""
    listed = pd.Series(sets, dtype=object).explode().dropna()
    if listed.empty:
        return np.zeros(len(skus), dtype=bool)
    table = pd.MultiIndex.from_arrays([listed.index.to_numpy(object),
                                       listed.to_numpy(object)])
    probe = pd.MultiIndex.from_arrays([keys.to_numpy(object), skus.to_numpy(object)])
    return probe.isin(table)


def duplicate_emails(emails: pd.Series) -> int:
    """Rule 14: rows whose lower-case e-mail already appeared."""
    return int(emails.astype(object).duplicated(keep="first").sum())


def _thin_segments_served(recs: pd.DataFrame, ctx: QAContext, config: RecsConfig) -> int:
    """Rule 12: rows served from a level that had fewer than N eligible ordered parts.

    A level may serve a user only if at least N parts that were ordered in the
    user's segment at that level are eligible, fit the vehicle (or are
    universal) and were not bought by the user.
    """
    n = config.rules.recs_per_user
    names = {config.level_name(level): level for level in config.levels}
    full = segment_keys(recs, config.fitment_attributes).to_numpy(object)
    level_keys = {name: segment_keys(recs, level).to_numpy(object)
                  for name, level in names.items()}
    violations = 0
    supported_cache: Dict[Tuple[str, object, object], frozenset] = {}
    universal = frozenset(ctx.catalog.index[ctx.catalog["is_universal"].fillna(False)
                                            .to_numpy(bool) | (not config.fitment_attributes)])
    slot_columns = [f"rec{i}_source" for i in range(1, n + 1)]
    popular = (recs[slot_columns].eq(POPULARITY_SOURCE).any(axis=1).to_numpy(bool)
               if slot_columns[-1] in recs.columns else np.ones(len(recs), dtype=bool))
    for row, (source, user) in enumerate(zip(recs["source"], recs["user_id"])):
        if source == NO_LEVEL and not popular[row]:
            continue  # a mix row no popularity level served, and no popularity slot
        level = names.get(source)
        if level is None:
            violations += 1
            continue
        if not level:
            continue
        segment = level_keys[source][row]
        key = (source, segment, full[row])
        if key not in supported_cache:
            skus = ctx.catalog_skus[ctx.popularity.observed(source, segment)]
            fits = ctx.fitting.get(full[row], frozenset())
            supported_cache[key] = frozenset(
                s for s in skus if s in ctx.eligible_skus and (s in fits or s in universal))
        supported = supported_cache[key]
        if len(supported) - len(supported.intersection(ctx.bought.get(user, ()))) < n:
            violations += 1
    return violations


def qa_table(counts: Mapping[int, int], config: RecsConfig) -> pd.DataFrame:
    """The ``qa_checks`` table: one row per rule with its violations."""
    listed = rules_for(config)
    names = {r.id: r.name.format(n=config.rules.recs_per_user, k=config.rules.max_per_part_type)
             for r in listed}
    return pd.DataFrame({
        "rule_id": [r.id for r in listed],
        "name": [names[r.id] for r in listed],
        "violations": [int(counts.get(r.id, 0)) for r in listed],
    })
