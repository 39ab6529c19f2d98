"""`generate`: the automotive world from (spec, seed), assembled from the other modules."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from models.world.arrays import _arrow, _epoch, _ids, _iso, _rfc3339, _take
from models.world.behaviour import _campaign, _event_frame, _events, _with_duplicates
from models.world.catalogue import _catalog_frame, _catalogue
from models.world.contract import ALLOCATION_VERSION, DAY, FAILURE_REASONS, TREATMENT_KINDS
from models.world.propensity import _propensity, _truth_tables
from models.world.spec import GroundTruth, World, WorldSpec
from models.world.users import _emails, _segments, _vehicles


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
        "propensity": pd.Series(camp_ev["propensity"], dtype="float64"),
        "allocation_version": _take(_arrow([ALLOCATION_VERSION]),
                                    np.zeros(len(camp_ev["t"]), np.int64),
                                    null=np.isnan(camp_ev["propensity"])),
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
