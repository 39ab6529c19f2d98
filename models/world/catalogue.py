"""The catalogue: base products by fitment class, colour and specialised variants,
services, prices, titles and fitment rows; and the written catalogue table with its
planted conflicting duplicates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.arrays import _arrow, _group_rank, _ranges
from models.world.spec import WorldSpec
from models.world.users import _Vehicles
from models.world.vocabulary import (BRANDS, CLASS_NAMES, COLOURS, FIT_MISSING, MAKE_BROAD,
                                     PART_TYPES, PERFORMANCE_TYPES, SERVICE, SERVICE_TYPES,
                                     SPECIFIC, UNIVERSAL, UNIVERSAL_ADJECTIVES,
                                     UNIVERSAL_BROAD)


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
