"""The ranker over the union of the slot mix's candidate sources (#14 item 4).

The slot mix (:func:`models.recommend.mix_all`) restricts every configured source
to the user's vehicle (eligible, fitting) and fills slots source by source. The
union ranker sees the same restricted candidates, one row per (user, SKU) that
any source offered, with each source's score and rank as features, and orders
the union by a LightGBM score instead of by the mix's quotas.

One function, :func:`union_features`, builds the rows both for training
(:func:`examples_at`, then :func:`train_union`) and for serving
(:func:`rerank_hook`, used by :class:`models.recommend_handler.UnionRerankHandler`),
so the feature columns are the same both ways by construction (a test checks).

A model is kept only when it beats the plain blended order (the mix's own list)
on validation at the evaluation k; otherwise the artifact says
``beats_baseline: false`` and jobs serve the blend (:func:`models.ranker.refusal`).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models.config import REPURCHASE_SOURCES, RecsConfig

#: Rank given to a candidate a source did not offer: below any real rank (a source
#: offers at most ``8 × recs_per_user`` candidates per user), so trees split cleanly.
MISSING_RANK = 1000.0
#: The name of the one ordered list handed to ``fill_slots`` when the ranker serves.
RANKED = "ranked"
#: Metadata key naming the sources a union model was trained on (in mix order).
SOURCES_KEY = "union_sources"


def feature_columns(sources: Sequence[str]) -> Tuple[str, ...]:
    """The union ranker's feature names for sources in mix order."""
    names = []
    for source in sources:
        names += [f"{source}.score", f"{source}.rank"]
    return tuple(names) + ("n_sources",)


def union_features(by_source: Mapping[str, pd.DataFrame], sources: Sequence[str]
                   ) -> pd.DataFrame:
    """One row per (user, SKU) offered by any source, with every source's score and rank.

    Args:
      by_source: source name → ``user_id, sku, score`` (already restricted to the
        user's vehicle, as ``mix_all`` hands them to the fill); a source's rank is
        the 1-based position in its own order (score descending, SKU ascending).
      sources: the mix's sources, in mix order (fixes the column order).

    Returns:
      ``user_id, sku, source`` then :func:`feature_columns`. ``source`` labels the
      row for the slot kind: buy-again when buy-again offered it (so SPEC rule 4's
      exemption is true of the row), else the first source in mix order offering it.
      A source that did not offer a row has score NaN and rank :data:`MISSING_RANK`.
    """
    parts = []
    for p, source in enumerate(sources):
        frame = by_source.get(source)
        if frame is None or not len(frame):
            continue
        frame = frame[["user_id", "sku", "score"]].sort_values(
            ["user_id", "score", "sku"], ascending=[True, False, True], kind="stable")
        frame = frame.drop_duplicates(["user_id", "sku"])
        parts.append(pd.DataFrame({
            "user_id": frame["user_id"].to_numpy(object), "sku": frame["sku"].to_numpy(object),
            "_p": p, "score": frame["score"].to_numpy(float),
            "rank": frame.groupby("user_id", sort=False).cumcount().to_numpy(float) + 1.0}))
    columns = ["user_id", "sku", "source", *feature_columns(sources)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("user_id", "sku", "source")
                                          else float) for c in columns})
    long = pd.concat(parts, ignore_index=True)
    wide = long.set_index(["user_id", "sku", "_p"])[["score", "rank"]].unstack("_p")
    keys = wide.index.to_frame(index=False)
    out = {"user_id": keys["user_id"].to_numpy(object), "sku": keys["sku"].to_numpy(object)}
    offered = np.zeros((len(keys), len(sources)), dtype=bool)
    for p, source in enumerate(sources):
        score = (wide[("score", p)].to_numpy(float) if ("score", p) in wide.columns
                 else np.full(len(keys), np.nan))
        rank = (wide[("rank", p)].to_numpy(float) if ("rank", p) in wide.columns
                else np.full(len(keys), np.nan))
        offered[:, p] = ~np.isnan(rank)
        out[f"{source}.score"] = score
        out[f"{source}.rank"] = np.where(np.isnan(rank), MISSING_RANK, rank)
    out["n_sources"] = offered.sum(axis=1).astype(float)
    label = np.array(sources, dtype=object)[offered.argmax(axis=1)]
    for p, source in enumerate(sources):
        if source in REPURCHASE_SOURCES:
            label = np.where(offered[:, p], source, label)
    out["source"] = label
    frame = pd.DataFrame(out)
    return frame[columns].sort_values(["user_id", "sku"], kind="stable").reset_index(drop=True)


def label(frame: pd.DataFrame, future: Mapping[object, frozenset]) -> np.ndarray:
    """1 where the user bought the SKU in the period after the cutoff, else 0."""
    bought = [sku in future.get(user, ()) for user, sku in
              zip(frame["user_id"].to_numpy(object), frame["sku"].to_numpy(object))]
    return np.asarray(bought, dtype=np.float32)


# --- serving: the hook mix_all calls instead of the plain fill ---------------------------

Fill = Callable[[Mapping[str, pd.DataFrame], Sequence[Tuple[str, int]], frozenset],
                pd.DataFrame]


def rank_union(union: pd.DataFrame, model) -> pd.DataFrame:
    """``union`` with ``score`` = the model's score, each user's rows best first."""
    names = list(model.features)
    scores = model.predict(union[names].to_numpy(np.float32)) if len(union) else np.zeros(0)
    ranked = union.assign(score=np.asarray(scores, float))
    return ranked.sort_values(["user_id", "score", "sku"], ascending=[True, False, True],
                              kind="stable").reset_index(drop=True)


def fill_ranked(ranked: pd.DataFrame, excluded: Optional[pd.DataFrame], k: int,
                fill: Fill) -> pd.DataFrame:
    """Each user's k slots from the ranked union, under the mix's rules.

    Rule 4's exclusion (``excluded``: ``user_id, sku``) removes rows whose label
    is a discovery source; buy-again rows are exempt, as in the mix. The diversity
    caps and the no-duplicate rules are ``fill_slots``' own (``fill``), given the
    union as one ordered list; each slot then gets back its row's source label.
    """
    rows = ranked
    if excluded is not None and len(excluded) and len(rows):
        pairs = pd.MultiIndex.from_frame(excluded[["user_id", "sku"]].astype(object))
        probe = pd.MultiIndex.from_arrays([rows["user_id"].to_numpy(object),
                                           rows["sku"].to_numpy(object)])
        drop = probe.isin(pairs) & ~rows["source"].isin(list(REPURCHASE_SOURCES)).to_numpy(bool)
        rows = rows.loc[~drop]
    slots = fill({RANKED: rows[["user_id", "sku", "score"]]}, [(RANKED, k)],
                 frozenset({RANKED}))
    kinds = rows[["user_id", "sku", "source"]].rename(columns={"source": "_kind"})
    slots = slots.merge(kinds, on=["user_id", "sku"], how="left")
    return slots.assign(source=slots.pop("_kind"))[["user_id", "slot", "sku", "source", "score"]]


def rerank_hook(model, sources: Sequence[str], drift=None):
    """The ``rerank`` argument of :func:`models.recommend.mix_all` that serves ``model``.

    ``drift`` (a :class:`models.ranker.DriftCounts`) bins every scored row's features.
    """

    def hook(by_source, excluded, k: int, fill: Fill) -> pd.DataFrame:
        union = union_features(by_source, sources)
        hook.rows_scored += len(union)
        if drift is not None and len(union):
            names = list(model.features)
            drift.add(union[names].to_numpy(float), names)
        return fill_ranked(rank_union(union, model), excluded, k, fill)

    hook.rows_scored = 0
    hook.drift = drift
    return hook


class Capture:
    """A ``rerank`` hook that serves the plain blend and keeps what it was given.

    Training calls the mix exactly as the job does with this hook, so the
    candidates it learns from are the ones the serving hook will see.
    """

    def __init__(self, sources: Sequence[str], mix: Sequence[Tuple[str, int]]):
        self.sources = tuple(sources)
        self.mix = tuple(mix)
        self.union: Optional[pd.DataFrame] = None
        self.blend: Optional[pd.DataFrame] = None
        self.rows_scored = 0

    def __call__(self, by_source, excluded, k: int, fill: Fill) -> pd.DataFrame:
        self.union = union_features(by_source, self.sources)
        if excluded is not None and len(excluded) and len(self.union):
            # The rows rule 4 removes from discovery can never be served: not examples.
            pairs = pd.MultiIndex.from_frame(excluded[["user_id", "sku"]].astype(object))
            probe = pd.MultiIndex.from_arrays([self.union["user_id"].to_numpy(object),
                                               self.union["sku"].to_numpy(object)])
            keep = ~(probe.isin(pairs)
                     & ~self.union["source"].isin(list(REPURCHASE_SOURCES)).to_numpy(bool))
            self.union = self.union.loc[keep].reset_index(drop=True)
        self.blend = fill(by_source, self.mix, frozenset(REPURCHASE_SOURCES))
        return self.blend


# --- training and selection ------------------------------------------------------------------

class Examples(NamedTuple):
    """One cutoff's union rows with labels, and the blend's own lists (``user_id, slot, sku``)."""

    frame: pd.DataFrame
    blend: pd.DataFrame


def precision_at(lists: pd.DataFrame, future: Mapping[object, frozenset], users: Sequence,
                 k: int) -> np.ndarray:
    """Per-user precision@k of ``lists`` (``user_id, slot, sku``) over ``users``."""
    top = lists.loc[lists["slot"].to_numpy(int) <= k]
    hits = {}
    for user, sku in zip(top["user_id"].to_numpy(object), top["sku"].to_numpy(object)):
        if sku in future.get(user, ()):
            hits[user] = hits.get(user, 0) + 1
    return np.array([hits.get(u, 0) / k for u in users], dtype=float)


def ranked_lists(frame: pd.DataFrame, scores: np.ndarray, k: int) -> pd.DataFrame:
    """Each user's top-k SKUs of the union by ``scores`` (``user_id, slot, sku``)."""
    ranked = frame[["user_id", "sku"]].assign(score=scores).sort_values(
        ["user_id", "score", "sku"], ascending=[True, False, True], kind="stable")
    ranked["slot"] = ranked.groupby("user_id", sort=False).cumcount().to_numpy() + 1
    return ranked.loc[ranked["slot"] <= k, ["user_id", "slot", "sku"]]


def _split(frame: pd.DataFrame, names: Sequence[str]):
    from models.ranker import Split
    frame = frame.sort_values(["user_id", "sku"], kind="stable")
    group = pd.factorize(frame["user_id"])[0].astype(np.int64)
    y = frame["y"].to_numpy(np.float32)
    return Split(frame[list(names)].to_numpy(np.float32), y, np.ones_like(y), group)


def train_union(train: Examples, valid: Examples, valid_future: Mapping[object, frozenset],
                config: RecsConfig, tconfig, k: int):
    """A LightGBM model over the union, kept only if it beats the blend on validation.

    Trains each objective of ``tconfig`` (early stopping on validation NDCG@k),
    picks the one with the best validation precision@k over users who bought in
    the validation period, and holds it against the blend's own lists on the same
    users. ``metadata["beats_baseline"]`` is True only when strictly better.

    Returns:
      ``(model, report)``: a :class:`models.ranker.RankerModel` whose metadata
      names the sources (:data:`SOURCES_KEY`), and the selection report.
    """
    from models.ranker import OBJECTIVES, train_lightgbm
    sources = config.candidates.sources
    names = list(feature_columns(sources))
    users = sorted((u for u, b in valid_future.items() if b), key=str)
    blend = precision_at(valid.blend, valid_future, users, k)
    objectives = OBJECTIVES if tconfig.objective == "auto" else (tconfig.objective,)
    tried = {}
    best = None
    for objective in objectives:
        model, info = train_lightgbm(_split(train.frame, names), _split(valid.frame, names),
                                     names, objective, tconfig)
        scores = model.predict(valid.frame[names].to_numpy(np.float32))
        got = precision_at(ranked_lists(valid.frame, scores, k), valid_future, users, k)
        tried[f"lightgbm_{objective}"] = {**info, f"precision@{k}": float(got.mean())}
        if best is None or got.mean() > best[2].mean():
            best = (f"lightgbm_{objective}", model, got)
    name, model, got = best
    from models.mix import paired_interval
    interval = paired_interval(got, blend) if len(users) > 1 else None
    key = f"precision@{k}"
    report = {"candidates": tried, "selected": name, "selection_metric": key,
              "baseline_name": "blended mix order", "baseline": {key: float(blend.mean())},
              "metrics": {name: {key: float(got.mean())}},
              "beats_baseline": bool(got.mean() > blend.mean()),
              "validation_users": len(users), "k": k,
              "paired_interval": None if interval is None else {
                  key_: float(v) for key_, v in interval.items()
                  if isinstance(v, (int, float, np.floating, np.integer))},
              SOURCES_KEY: list(sources), "mix": [list(p) for p in config.candidates.mix]}
    model.metadata.update(report)
    return model, report


def check_sources(model, config: RecsConfig) -> None:
    """One-line ``ValueError`` unless ``model`` was trained on this config's mix sources."""
    trained = tuple(model.metadata.get(SOURCES_KEY, ()))
    wanted = config.candidates.sources
    if trained != wanted:
        raise ValueError(f"ranker {model.version} was trained on the sources "
                         f"{', '.join(trained) or 'segment_popularity pools'}; this "
                         f"configuration's mix has {', '.join(wanted)}")
    if tuple(model.features) != feature_columns(wanted):
        raise ValueError(f"ranker {model.version} features differ from the union features "
                         f"of {', '.join(wanted)}")


def is_union(model) -> bool:
    """True for a model trained over the union of mix sources."""
    return SOURCES_KEY in model.metadata


def future_purchases(events: pd.DataFrame, after: pd.Timestamp, days: float
                     ) -> Dict[str, frozenset]:
    """user → SKUs ordered in ``(after, after + days]`` (one order line per order and SKU)."""
    from models.popularity import order_lines
    lines = order_lines(events)
    times = pd.to_datetime(lines["event_time"], utc=True)
    window = lines.loc[((times > after) & (times <= after + pd.Timedelta(days=days))).to_numpy(
        bool)]
    return {str(u): frozenset(g) for u, g in window.groupby("user_id")["sku"]}


def examples_at(users: pd.DataFrame, events: pd.DataFrame, catalog: pd.DataFrame,
                fitment: pd.DataFrame, cutoff: pd.Timestamp, days: float,
                config: RecsConfig) -> Tuple[Examples, Dict[str, frozenset]]:
    """The union rows at ``cutoff`` (history up to it), labelled by the next ``days``.

    The mix runs exactly as the job runs it (``recommend_history`` with a
    capturing hook), so the rows are the candidates the served ranker would see.
    ``users``/``events``/``catalog``/``fitment`` are validated frames (as
    ``pipelines.tune.load_data`` returns them; ``catalog`` resolved).
    """
    from models.recommend_handler import (CapturingMixHandler, prepare_history,
                                          recommend_history)
    times = pd.to_datetime(events["event_time"], utc=True)
    history = prepare_history(users, events.loc[(times <= cutoff).to_numpy(bool)], cutoff,
                              config)
    capture = Capture(config.candidates.sources, config.candidates.mix)
    recommend_history(history, catalog, fitment, cutoff, config,
                      handler=CapturingMixHandler(config, capture))
    future = future_purchases(events, cutoff, days)
    union = capture.union if capture.union is not None else union_features(
        {}, config.candidates.sources)
    union = union.assign(user_id=union["user_id"].astype(str))
    blend = (capture.blend if capture.blend is not None
             else pd.DataFrame(columns=["user_id", "slot", "sku"]))
    blend = blend.assign(user_id=blend["user_id"].astype(str))[["user_id", "slot", "sku"]]
    return Examples(union.assign(y=label(union, future)), blend), future


def examples_over(users: pd.DataFrame, events: pd.DataFrame, catalog: pd.DataFrame,
                  fitment: pd.DataFrame, cutoffs: Sequence[pd.Timestamp], days: float,
                  config: RecsConfig) -> Tuple[Examples, Dict[str, frozenset]]:
    """:func:`examples_at` at several cutoffs, one group per (cutoff, user).

    ``user_id`` becomes ``<cutoff ISO>|<user_id>`` so a user's rows at two cutoffs
    are two ranking groups and two validation users.
    """
    frames, blends, future = [], [], {}
    for cutoff in cutoffs:
        got, fut = examples_at(users, events, catalog, fitment, cutoff, days, config)
        tag = f"{pd.Timestamp(cutoff).isoformat()}|"
        frames.append(got.frame.assign(user_id=tag + got.frame["user_id"].astype(str)))
        blends.append(got.blend.assign(user_id=tag + got.blend["user_id"].astype(str)))
        future.update({tag + u: b for u, b in fut.items()})
    return Examples(pd.concat(frames, ignore_index=True),
                    pd.concat(blends, ignore_index=True)), future
