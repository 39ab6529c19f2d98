"""The catalogue as dense arrays: conflict resolution and per-SKU eligibility.

The field's 538 violations of rule 3 came from SKUs listed twice with
different part types. Here every SKU has exactly one canonical row, chosen by a
deterministic rule, and every losing row is reported.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from models.config import RulesConfig

CATALOG_COLUMNS = ("sku", "title", "part_type", "brand", "price", "image_url", "tags",
                   "is_universal", "variant_group")


class Resolution(NamedTuple):
    """Canonical catalogue, exact duplicates dropped, and conflicting rows reported."""

    catalog: pd.DataFrame
    duplicates: int
    conflicts: pd.DataFrame  # the losing rows, with a `reason` column


def _canonical_key(frame: pd.DataFrame) -> pd.Series:
    """A row's contract fields as one comparable string."""
    parts = [frame[c].astype(object).map(repr) for c in CATALOG_COLUMNS]
    key = parts[0]
    for part in parts[1:]:
        key = key + "\x1f" + part
    return key


def resolve_conflicts(frame: pd.DataFrame) -> Resolution:
    """One row per SKU, chosen deterministically.

    Identical repeats are duplicates. Rows that disagree are conflicts: the row
    kept is the first by (part_type, then every other field) in sort order, so
    the result never depends on file or bundle order; the others are returned
    with a reason naming the kept part type.
    """
    if frame.empty:
        return Resolution(frame.copy(), 0, frame.assign(reason=pd.Series(dtype=object)))
    key = _canonical_key(frame)
    distinct = frame.assign(_key=key).drop_duplicates("_key")
    duplicates = len(frame) - len(distinct)
    ordered = distinct.sort_values(["sku", "part_type", "_key"], kind="stable")
    first = ~ordered["sku"].duplicated(keep="first")
    kept = ordered.loc[first].drop(columns="_key").reset_index(drop=True)
    losers = ordered.loc[~first].drop(columns="_key")
    kept_type = kept.set_index("sku")["part_type"]
    reasons = [
        f"catalogue conflict: sku {sku} listed with part_type {lost!r}; kept {kept_type[sku]!r}"
        for sku, lost in zip(losers["sku"], losers["part_type"])
    ]
    return Resolution(kept, duplicates, losers.assign(reason=reasons).reset_index(drop=True))


def ineligibility_reasons(catalog: pd.DataFrame, rules: RulesConfig) -> np.ndarray:
    """Why each SKU may never be recommended (None where it may), rules 1, 5, 6, 7 and low value."""
    n = len(catalog)
    reasons = np.full(n, None, dtype=object)

    def mark(mask, reason):
        reasons[np.asarray(mask, bool) & (reasons == None)] = reason  # noqa: E711

    price = catalog["price"].to_numpy(float)
    mark(~(price >= rules.min_price), f"price below {rules.min_price:g}")
    excluded = set(rules.excluded_tags)
    mark(catalog["tags"].map(lambda tags: bool(excluded.intersection(tags or ()))),
         "excluded tag")
    mark(service_sku_mask(catalog["sku"], rules), "service SKU")
    mark(~https_mask(catalog["image_url"]), "image URL not https")
    mark(low_value_mask(catalog["part_type"], rules), "low-value part type")
    return reasons


def service_sku_mask(skus: pd.Series, rules: RulesConfig) -> np.ndarray:
    """Rule 6: SKUs matching a configured ``fnmatch`` service pattern (case-insensitive)."""
    if not rules.service_sku_patterns:
        return np.zeros(len(skus), dtype=bool)
    pattern = "|".join(fnmatch.translate(p) for p in rules.service_sku_patterns)
    return skus.astype(object).astype(str).str.match(
        f"(?i:{pattern})").fillna(False).to_numpy(bool)


# Rule 7's image URL: https, a host name (labels of letters, digits and inner hyphens), an
# optional port, then only RFC 3986 URL characters. No whitespace, quotes, angle brackets,
# backslashes, control or non-ASCII characters: the URL goes into an HTML attribute of the
# e-mail, and `https://x/a.jpg" onerror="...` must not be able to leave it.
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
IMAGE_URL_PATTERN = (rf"[Hh][Tt][Tt][Pp][Ss]://{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::\d{{1,5}})?"
                     r"(?:[/?#][A-Za-z0-9\-._~:/?#\[\]@!$&()*+,;=%]*)?")
_IMAGE_URL = re.compile(IMAGE_URL_PATTERN, re.ASCII)


def is_image_url(url: object) -> bool:
    """Rule 7 for one value: an https URL with a real host that is safe inside an HTML attribute.

    >>> [is_image_url(u) for u in ("https://img.example.com/a.jpg", "HTTPS://cdn:8443/x?s=2")]
    [True, True]
    >>> [is_image_url(u) for u in ("http://img/a.jpg", "https:///x", 'https://x/a.jpg" onerror="x',
    ...                            "https://x/a b.jpg", "https://x/<script>", None)]
    [False, False, False, False, False, False]
    """
    return isinstance(url, str) and _IMAGE_URL.fullmatch(url) is not None


def https_mask(urls: pd.Series) -> np.ndarray:
    """Rule 7 over a column: the one predicate behind catalogue eligibility and the QA check.

    Decided once per distinct URL (a QA frame repeats each catalogue URL across users).
    """
    raw = urls.to_numpy(object)
    verdict = {u: is_image_url(u) for u in {u for u in raw if isinstance(u, str)}}
    return np.fromiter((isinstance(u, str) and verdict[u] for u in raw), dtype=bool,
                       count=len(raw))


def low_value_mask(part_types: pd.Series, rules: RulesConfig) -> np.ndarray:
    """Low-value part types (decided once per distinct type, not per row)."""
    values = part_types.astype(object)
    verdict = {t: is_low_value(t, rules) for t in values.dropna().unique()}
    return values.map(verdict).fillna(False).to_numpy(bool)


def is_low_value(part_type, rules: RulesConfig) -> bool:
    """A low-value part type (gaskets, bolt sets, ...) that is not a listed exception."""
    kind = str(part_type).strip().lower()
    if kind in rules.low_value_exceptions:
        return False
    return any(word in kind for word in rules.low_value_keywords)


@dataclass(frozen=True)
class CatalogArrays:
    """The resolved catalogue as parallel numpy arrays indexed by SKU position.

    SKUs are sorted, so ``index_of`` is a binary search and every worker builds
    the same indices from the same catalogue.
    """

    sku: np.ndarray
    price: np.ndarray
    part_type: np.ndarray
    image_url: np.ndarray
    is_universal: np.ndarray
    variant_key: np.ndarray  # variant_group, or the SKU itself when it has none
    eligible: np.ndarray

    @classmethod
    def build(cls, catalog: pd.DataFrame, rules: RulesConfig) -> "CatalogArrays":
        ordered = catalog.sort_values("sku", kind="stable").reset_index(drop=True)
        sku = ordered["sku"].to_numpy(object).astype(str)
        group = ordered["variant_group"].astype(object)
        variant_key = np.where(group.isna(), sku, "group:" + group.fillna("").astype(str))
        return cls(
            sku=sku,
            price=ordered["price"].to_numpy(float),
            part_type=ordered["part_type"].to_numpy(object).astype(str),
            image_url=ordered["image_url"].astype(object).fillna("").to_numpy(object).astype(str),
            is_universal=ordered["is_universal"].to_numpy(bool),
            variant_key=np.asarray(variant_key, dtype=str),
            eligible=ineligibility_reasons(ordered, rules) == None,  # noqa: E711
        )

    def __len__(self) -> int:
        return len(self.sku)

    def index_of(self, skus) -> np.ndarray:
        """Positions of SKUs in the catalogue, -1 where unknown."""
        skus = np.asarray(skus, dtype=str)
        if len(self.sku) == 0:
            return np.full(len(skus), -1)
        pos = np.searchsorted(self.sku, skus)
        pos = np.clip(pos, 0, len(self.sku) - 1)
        return np.where(self.sku[pos] == skus, pos, -1)
