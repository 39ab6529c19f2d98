"""The ranker (SPEC §6): training, the model object, drift (PSI) and re-ranked recommendations.

Pure Python over numpy/pandas, LightGBM and scikit-learn; no Beam. The model
object (:class:`RankerModel`) is what a Beam DoFn loads in ``setup()``, as a
RunInference model handler would; :class:`RerankingRecommender` is the batch
job's :class:`~models.recommend.Recommender` with the model re-ranking each
user's candidate pool before the SPEC §3 rules pick the four recommendations.

Scores are in [0, 1] whatever the model kind, so QA rule 11 (scores within the
formula's range) and rule 10 (non-increasing) hold unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models import metrics
from models.catalog import CatalogArrays
from models.config import RecsConfig, ScoringConfig
from models.features import (USER_FEATURES, FeatureConfig, ItemTable, PoolBuilder, Pools,
                             candidate_pools, feature_names)
from models.popularity import PopularityIndex
from models.recommend import Picks, Recommender, greedy_pick

ARTIFACT_FORMAT = "segment-recs-ranker"
ARTIFACT_FORMAT_VERSION = 1
KINDS = ("lightgbm", "logistic")
OBJECTIVES = ("lambdarank", "binary")
DEFAULT_PSI_THRESHOLD = 0.2
PSI_BINS = 10
PSI_FLOOR = 1e-4


# ----------------------------------------------------------------------------- ranking metrics

def group_hits(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k hits per group (ties broken by row order) and relevant items per group.

    ``groups`` is any integer or string label per row; groups come out in
    sorted order. Feeds :func:`models.metrics.ndcg_at_k` and friends, so pool
    metrics follow the same formulas as the backtest.
    """
    codes, uniques = pd.factorize(pd.Series(groups), sort=True)
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, float), codes))
    codes_sorted = codes[order]
    starts = np.searchsorted(codes_sorted, np.arange(len(uniques)))
    rank = np.arange(len(order)) - starts[codes_sorted]
    top = rank < k
    hits = np.zeros((len(uniques), k), dtype=bool)
    hits[codes_sorted[top], rank[top]] = np.asarray(labels)[order][top] > 0
    n_relevant = np.bincount(codes, weights=(np.asarray(labels) > 0).astype(float),
                             minlength=len(uniques))
    return hits, n_relevant


def pool_ndcg(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = 4) -> float:
    """Mean NDCG@k over groups with at least one positive (:func:`models.metrics.ndcg_at_k`).

    >>> round(pool_ndcg(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0]),
    ...                 np.array([0.9, 0.1, 0.8, 0.2]), k=2), 4)
    0.8155
    """
    hits, n_relevant = group_hits(groups, labels, scores, k)
    return metrics.ndcg_at_k(hits, n_relevant)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties); NaN with a single class.

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    labels = np.asarray(labels) > 0
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, float)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


# ----------------------------------------------------------------------------- PSI

def reference_distribution(values: np.ndarray, bins: int = PSI_BINS) -> dict:
    """Quantile bin edges of a feature and the share of rows in each bin.

    Bins are ``(-inf, e0], (e0, e1], ..., (e_last, inf)``; repeated quantiles
    (a feature that is mostly 0) collapse, so a binary feature has two bins.
    """
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"edges": [], "shares": [1.0]}
    # Quantiles that are data values ("inverted_cdf"), so a 0/1 feature keeps two bins.
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1],
                                  method="inverted_cdf"))
    counts = bin_counts(values, edges)
    return {"edges": edges.tolist(), "shares": (counts / counts.sum()).tolist()}


def bin_counts(values: np.ndarray, edges: Sequence[float],
               weights: Optional[np.ndarray] = None) -> np.ndarray:
    """(Weighted) rows per bin of :func:`reference_distribution`'s layout; non-finite skipped."""
    values = np.asarray(values, float)
    finite = np.isfinite(values)
    w = None if weights is None else np.asarray(weights, float)[finite]
    return np.bincount(np.searchsorted(np.asarray(edges, float), values[finite], side="left"),
                       weights=w, minlength=len(edges) + 1).astype(float)


def psi(expected_shares: Sequence[float], actual_counts: Sequence[float],
        floor: float = PSI_FLOOR) -> float:
    """Population stability index: sum over bins of (a - e) · ln(a / e).

    Shares are floored at ``floor`` so an empty bin does not make it infinite.
    Rule of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 retrain.

    >>> psi([0.5, 0.5], [50, 50])
    0.0
    >>> round(psi([0.5, 0.5], [90, 10]), 3)
    0.879
    """
    expected = np.maximum(np.asarray(expected_shares, float), floor)
    actual = np.asarray(actual_counts, float)
    total = actual.sum()
    if total <= 0:
        return float("nan")
    actual = np.maximum(actual / total, floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class DriftCounts:
    """Additive per-feature bin counts of scored rows, turned into PSI against training.

    Accumulator layout: ``counts[feature]`` is a float array with one cell per
    bin of the model's reference distribution; two accumulators merge by
    adding the arrays, so it is a CombineFn accumulator as it stands.
    """

    def __init__(self, distributions: Mapping[str, dict]):
        self.edges = {name: np.asarray(d["edges"], float) for name, d in distributions.items()}
        self.counts = {name: np.zeros(len(e) + 1) for name, e in self.edges.items()}
        self.rows = 0

    def add(self, x: np.ndarray, names: Sequence[str],
            weights: Optional[np.ndarray] = None) -> None:
        """Bins the rows of ``x``; ``weights`` say how many scored rows each one stands for."""
        for j, name in enumerate(names):
            if name in self.edges:
                self.counts[name] += bin_counts(x[:, j], self.edges[name], weights)
        self.rows += int(round(float(np.sum(weights)))) if weights is not None else len(x)

    def merge(self, other: "DriftCounts") -> "DriftCounts":
        for name, counts in other.counts.items():
            self.counts[name] = self.counts.get(name, 0) + counts
        self.rows += other.rows
        return self

    def to_dict(self) -> dict:
        return {"rows": self.rows, "counts": {k: v.tolist() for k, v in self.counts.items()}}

    @classmethod
    def from_dict(cls, distributions: Mapping[str, dict], state: dict) -> "DriftCounts":
        drift = cls(distributions)
        drift.rows = int(state.get("rows", 0))
        for name, counts in state.get("counts", {}).items():
            if name in drift.counts and len(counts) == len(drift.counts[name]):
                drift.counts[name] = np.asarray(counts, float)
        return drift


def drift_table(distributions: Mapping[str, dict], drift: DriftCounts,
                threshold: float = DEFAULT_PSI_THRESHOLD) -> pd.DataFrame:
    """One row per feature: PSI of the scored rows against training and whether it flags.

    A flagged feature (PSI above ``threshold``) means the model sees a
    population it was not trained on: retrain.
    """
    rows = []
    for name, dist in distributions.items():
        value = psi(dist["shares"], drift.counts.get(name, np.zeros(1)))
        rows.append({"feature": name, "psi": value,
                     "flagged": bool(np.isfinite(value) and value > threshold)})
    table = pd.DataFrame(rows, columns=["feature", "psi", "flagged"])
    table["rows"] = drift.rows
    table["threshold"] = threshold
    return table.sort_values("psi", ascending=False, kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- model object

def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _log_scale(x: np.ndarray) -> np.ndarray:
    """sign(x) · log1p(|x|): what the logistic baseline sees, so 9,999-day gaps don't dominate."""
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass
class LogisticParams:
    """A fitted logistic regression on log-scaled, standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def standardised(self, x: np.ndarray) -> np.ndarray:
        return (_log_scale(np.asarray(x, float)) - self.mean) / self.scale

    def decision(self, x: np.ndarray) -> np.ndarray:
        return self.standardised(x) @ self.coef + self.intercept

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": float(self.intercept)}

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticParams":
        return cls(np.asarray(d["mean"], float), np.asarray(d["scale"], float),
                   np.asarray(d["coef"], float), float(d["intercept"]))


class RankerModel:
    """A trained ranker: LightGBM booster or logistic regression, with its metadata.

    ``predict`` returns a score in [0, 1]: for probability models (LightGBM
    binary, logistic) a 7-day purchase probability corrected for negative
    downsampling (odds × negative keep rate); for lambdarank the logistic of
    the ranking score, which orders but is not a probability.
    """

    def __init__(self, kind: str, objective: str, features: Sequence[str], model,
                 keep_rate: float = 1.0, metadata: Optional[dict] = None,
                 num_threads: int = 1):
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}")
        # One thread per prediction call: Beam already runs one call per core, and
        # OpenMP threads competing for the same cores slow LightGBM down several times.
        self.num_threads = num_threads
        self.kind = kind
        self.objective = objective
        self.features = tuple(features)
        self.model = model
        self.keep_rate = float(keep_rate)
        self.metadata = dict(metadata or {})

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unversioned"))

    @property
    def calibrated(self) -> bool:
        return self.objective != "lambdarank"

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The model's own output: log-odds (probability models) or ranking score."""
        x = np.asarray(x, np.float32)
        if self.kind == "logistic":
            return self.model.decision(x)
        return self.model.predict(x, raw_score=True, num_threads=self.num_threads)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = self.raw(x)
        if self.calibrated and 0 < self.keep_rate < 1:
            z = z + math.log(self.keep_rate)  # odds × keep rate undoes the downsampling
        return _sigmoid(z)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Per-feature contributions to ``raw`` (last column: the bias); rows sum to ``raw``.

        LightGBM's ``pred_contrib`` (TreeSHAP); for the logistic model
        coefficient × standardised value.
        """
        x = np.asarray(x, np.float32)
        if self.kind == "logistic":
            parts = self.model.standardised(x) * self.model.coef
            return np.column_stack([parts, np.full(len(x), self.model.intercept)])
        return np.asarray(self.model.predict(x, pred_contrib=True,
                                             num_threads=self.num_threads))

    # Serialisation: one JSON document, no pickle, readable by any later version.
    def to_bytes(self) -> bytes:
        payload = (self.model.to_dict() if self.kind == "logistic"
                   else self.model.model_to_string())
        doc = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION,
               "kind": self.kind, "objective": self.objective, "features": list(self.features),
               "keep_rate": self.keep_rate, "metadata": self.metadata, "model": payload}
        return json.dumps(doc, default=_json_default).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "RankerModel":
        doc = json.loads(data.decode("utf-8"))
        if doc.get("format") != ARTIFACT_FORMAT:
            raise ValueError("not a ranker artifact (format field missing or wrong)")
        if doc.get("format_version", 0) > ARTIFACT_FORMAT_VERSION:
            raise ValueError(f"ranker artifact format {doc['format_version']} is newer than "
                             f"this code ({ARTIFACT_FORMAT_VERSION})")
        if doc["kind"] == "logistic":
            model = LogisticParams.from_dict(doc["model"])
        else:
            import lightgbm as lgb
            model = lgb.Booster(model_str=doc["model"])
        return cls(doc["kind"], doc["objective"], doc["features"], model, doc["keep_rate"],
                   doc["metadata"])

    def check_features(self, config: RecsConfig) -> None:
        """Fail fast when the model was trained on other features than this config makes."""
        from models import union_ranker
        if union_ranker.is_union(self):  # trained over the mix's sources (#14)
            union_ranker.check_sources(self, config)
            return
        if not config.candidates.popularity_only:
            raise ValueError(f"ranker {self.version} re-ranks segment-popularity pools; this "
                             f"configuration's candidates.mix needs a union ranker trained "
                             f"on its sources ({', '.join(config.candidates.sources)})")
        expected = feature_names(config)
        if tuple(self.features) != expected:
            missing = sorted(set(expected) ^ set(self.features))
            raise ValueError(f"ranker {self.version} was trained on different features than "
                             f"this configuration produces (differing: {missing})")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of both learners; defaults measured on the demo world (docs/ranker.md).

    ``objective`` is ``lambdarank``, ``binary`` or ``auto`` (train both and
    keep the better one by validation NDCG@k).
    """

    objective: str = "binary"
    learning_rate: float = 0.1
    num_leaves: int = 15
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_rounds: int = 300
    early_stopping_rounds: int = 40
    num_threads: int = 1  # measured: faster than 2 on a shared 2-core machine (bench)
    logistic_c: float = 1.0
    k: int = 4
    seed: int = 7

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES + ("auto",):
            raise ValueError(f"objective must be one of {OBJECTIVES + ('auto',)}, "
                             f"got {self.objective!r}")
        if self.max_rounds < 1 or self.num_leaves < 2 or self.k < 1:
            raise ValueError("max_rounds >= 1, num_leaves >= 2 and k >= 1 are required")


class Split(NamedTuple):
    """A model-ready slice of the examples: matrix, labels, weights and group ids."""

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    group: np.ndarray  # one id per (user, cutoff), rows of a group contiguous

    def __len__(self) -> int:
        return len(self.y)


def to_split(frame: pd.DataFrame, names: Sequence[str]) -> Split:
    """Examples sorted by (cutoff, user) into a :class:`Split`."""
    frame = frame.sort_values(["cutoff", "user_id"], kind="stable")
    group = pd.factorize(frame["cutoff"].astype(str) + "|" + frame["user_id"].astype(str))[0]
    return Split(frame[list(names)].to_numpy(np.float32), frame["label"].to_numpy(np.int8),
                 frame["weight"].to_numpy(float), group.astype(np.int64))


def informative(split: Split) -> Split:
    """Only the groups with at least one positive: the rows NDCG can see."""
    positives = np.bincount(split.group, weights=split.y.astype(float))
    keep = positives[split.group] > 0
    return Split(split.x[keep], split.y[keep], split.weight[keep],
                 pd.factorize(split.group[keep])[0].astype(np.int64))


def _group_sizes(group: np.ndarray) -> np.ndarray:
    change = np.flatnonzero(np.diff(group)) + 1
    return np.diff(np.concatenate([[0], change, [len(group)]]))


def keep_rate_of(split: Split) -> float:
    """Share of negatives kept by downsampling, from the weights (1 / rate per negative)."""
    negatives = split.y == 0
    total = split.weight[negatives].sum()
    return float(negatives.sum() / total) if total > 0 else 1.0


def train_lightgbm(train: Split, valid: Split, names: Sequence[str], objective: str,
                   tconfig: TrainConfig) -> Tuple[RankerModel, dict]:
    """LightGBM with early stopping on validation NDCG@k (groups with a positive)."""
    import lightgbm as lgb
    params = {
        "objective": objective, "learning_rate": tconfig.learning_rate,
        "num_leaves": tconfig.num_leaves, "min_data_in_leaf": tconfig.min_data_in_leaf,
        "feature_fraction": tconfig.feature_fraction,
        "bagging_fraction": tconfig.bagging_fraction, "bagging_freq": 1,
        "lambda_l2": tconfig.lambda_l2, "num_threads": tconfig.num_threads,
        "seed": tconfig.seed, "deterministic": True, "verbose": -1,
        "metric": "ndcg", "eval_at": [tconfig.k],
    }
    if objective == "lambdarank":
        params["lambdarank_truncation_level"] = 4 * tconfig.k
    started = time.perf_counter()
    # Groups are needed by lambdarank, and by the NDCG metric whatever the objective.
    dtrain = lgb.Dataset(train.x, train.y, feature_name=list(names),
                         group=_group_sizes(train.group), free_raw_data=True)
    watched = informative(valid)
    dvalid = lgb.Dataset(watched.x, watched.y, group=_group_sizes(watched.group),
                         reference=dtrain)
    booster = lgb.train(params, dtrain, num_boost_round=tconfig.max_rounds,
                        valid_sets=[dvalid], valid_names=["valid"],
                        callbacks=[lgb.early_stopping(tconfig.early_stopping_rounds,
                                                      verbose=False)])
    best = booster.best_iteration or booster.current_iteration()
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    seconds = time.perf_counter() - started
    model = RankerModel("lightgbm", objective, names, booster, keep_rate_of(train))
    return model, {"train_seconds": round(seconds, 3), "best_iteration": int(best)}


def train_logistic(train: Split, names: Sequence[str], tconfig: TrainConfig
                   ) -> Tuple[RankerModel, dict]:
    """Logistic regression on log-scaled standardised features (the baseline)."""
    from sklearn.linear_model import LogisticRegression
    started = time.perf_counter()
    z = _log_scale(train.x.astype(float))
    mean, scale = z.mean(axis=0), z.std(axis=0)
    scale[scale == 0] = 1.0
    fit = LogisticRegression(C=tconfig.logistic_c, max_iter=500)
    fit.fit((z - mean) / scale, train.y)
    params = LogisticParams(mean, scale, fit.coef_[0].astype(float),
                            float(fit.intercept_[0]))
    seconds = time.perf_counter() - started
    return (RankerModel("logistic", "binary", names, params, keep_rate_of(train)),
            {"train_seconds": round(seconds, 3)})


def evaluate_split(model: RankerModel, split: Split, k: int) -> dict:
    """Validation figures of one model: NDCG@k (groups with a positive) and ROC AUC (all rows)."""
    scores = model.raw(split.x)
    return {f"ndcg@{k}": pool_ndcg(split.group, split.y, scores, k),
            "roc_auc": roc_auc(split.y, scores)}


BASELINE_ORDER = "popularity_order"


def popularity_order(x: np.ndarray, names: Sequence[str],
                     scoring: Optional[ScoringConfig] = None) -> np.ndarray:
    """Score of the plain order the ranker re-ranks, from the feature rows.

    The batch job without a model ranks a pool by its base score (popularity
    at the serving level plus the vehicle-specific bonus, ``s_base``) raised by
    the user's intent: the cart weight when the SKU was carted, else the view
    weight when it was viewed (:class:`models.recommend.Recommender`). A model
    earns its place only by ordering the same pools better than this.
    """
    scoring = scoring or ScoringConfig()
    column = {name: i for i, name in enumerate(names)}
    x = np.asarray(x, float)
    intent = np.where(x[:, column["p_carted_sku"]] > 0, scoring.cart_weight,
                      np.where(x[:, column["p_views_sku"]] > 0, scoring.view_weight, 0.0))
    return x[:, column["s_base"]] + intent


def refusal(model: "RankerModel") -> Optional[str]:
    """Why a job must not serve this model (one line), or None when it may.

    An artifact whose selected model did not beat the popularity order on
    validation says ``beats_baseline: false``; serving it would make the lists
    worse than not using it. Artifacts older than the check carry no flag and
    are served as before.
    """
    meta = model.metadata
    if meta.get("beats_baseline", True) is not False:
        return None
    metric = meta.get("selection_metric", "ndcg")
    base = meta.get("baseline", {}).get(metric)
    best = meta.get("metrics", {}).get(meta.get("selected"), {}).get(metric)
    figures = (f" (validation {metric} {best:.4f} against {base:.4f})"
               if isinstance(best, float) and isinstance(base, float) else "")
    if meta.get("union_sources"):
        return (f"ranker {model.version} does not beat the blended mix order"
                f"{figures}; serving the blend instead")
    return (f"ranker {model.version} does not beat the popularity order it re-ranks"
            f"{figures}; serving the popularity order instead")


class Trained(NamedTuple):
    """Outcome of :func:`train_and_select`: the kept model, the runner-up and a report."""

    model: RankerModel
    challenger: RankerModel
    report: dict


def train_and_select(train: Split, valid: Split, names: Sequence[str],
                     tconfig: TrainConfig, scoring: Optional[ScoringConfig] = None) -> Trained:
    """Train LightGBM (one or both objectives) and the logistic baseline; keep the best.

    "Best" is validation NDCG@k over (user, cutoff) groups with a purchase: AUC
    alone proves no top-k lift (SPEC §6). Ties go to the simpler model.

    The best model is then held against the order it re-ranks
    (:func:`popularity_order`, with ``scoring``) on the same validation pools:
    ``report["beats_baseline"]`` is True only when its NDCG@k is strictly
    higher. A lambdarank model with validation AUC 0.57 was once selected and
    was the worst on test (#14); a model that cannot beat the plain order is
    reported, and jobs serve the plain order instead (:func:`refusal`).
    """
    objectives = OBJECTIVES if tconfig.objective == "auto" else (tconfig.objective,)
    candidates: List[Tuple[str, RankerModel, dict]] = []
    logistic, info = train_logistic(train, names, tconfig)
    candidates.append(("logistic", logistic, info))
    for objective in objectives:
        model, info = train_lightgbm(train, valid, names, objective, tconfig)
        candidates.append((f"lightgbm_{objective}", model, info))
    report = {}
    for name, model, info in candidates:
        report[name] = {**info, **evaluate_split(model, valid, tconfig.k)}
    key = f"ndcg@{tconfig.k}"
    ranked = sorted(range(len(candidates)), key=lambda i: (-report[candidates[i][0]][key], i))
    best = candidates[ranked[0]]
    # The challenger reported beside it is the best model of the other family.
    other = next(candidates[i] for i in ranked
                 if (candidates[i][1].kind != best[1].kind))
    plain = popularity_order(valid.x, names, scoring)
    baseline = {key: pool_ndcg(valid.group, valid.y, plain, tconfig.k),
                "roc_auc": roc_auc(valid.y, plain)}
    beats = bool(report[best[0]][key] > baseline[key])
    return Trained(best[1], other[1], {"candidates": report, "selected": best[0],
                                       "challenger": other[0], "selection_metric": key,
                                       "baseline_name": BASELINE_ORDER, "baseline": baseline,
                                       "beats_baseline": beats})


def feature_distributions(x: np.ndarray, names: Sequence[str]) -> Dict[str, dict]:
    """Reference distribution of every feature (the PSI baseline stored with the model)."""
    return {name: reference_distribution(x[:, j]) for j, name in enumerate(names)}


def library_versions() -> Dict[str, str]:
    import lightgbm
    import sklearn
    return {"lightgbm": lightgbm.__version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__, "pandas": pd.__version__}


def model_version(model: RankerModel, trained_at: pd.Timestamp) -> str:
    """``ranker-<kind>-<objective>-<UTC time>-<content hash>``: sortable and unique."""
    digest = hashlib.sha256(model.to_bytes()).hexdigest()[:8]
    return f"ranker-{model.kind}-{model.objective}-{trained_at:%Y%m%dT%H%M%SZ}-{digest}"


# ----------------------------------------------------------------------------- explanations

def explain(model: RankerModel, x: np.ndarray, top: int = 3) -> List[List[Tuple[str, float]]]:
    """The ``top`` features pushing each row's score the most (by |contribution|)."""
    contrib = model.contributions(x)[:, :-1]
    order = np.argsort(-np.abs(contrib), axis=1)[:, :top]
    return [[(model.features[j], float(contrib[i, j])) for j in row]
            for i, row in enumerate(order)]


# ----------------------------------------------------------------------------- serving

_COLD_USER_ROW = np.array([365.0 if c == "u_recency_days" else 0.0 for c in USER_FEATURES])


def _cold(users: pd.DataFrame) -> np.ndarray:
    """Users with no signal at all: every feature row of theirs equals every other's."""
    n = len(users)
    empty = np.ones(n, bool)
    for column in ("sig_sku", "typ_name", "bought", "viewed", "carted"):
        if column in users.columns:
            lengths = np.fromiter(map(len, users[column].to_numpy(object)), np.int64, count=n)
            empty &= lengths == 0
    empty &= (users[list(USER_FEATURES)].to_numpy(float) == _COLD_USER_ROW).all(axis=1)
    return empty & ~np.isfinite(users["u_usual_price"].to_numpy(float))


class RerankingRecommender(Recommender):
    """The batch Recommender with the ranker re-ordering each user's candidate pool.

    Per vehicle: the candidate stage (segment popularity with fallback levels
    and the rule-12 level choice) proposes each user's pool, the model scores
    every pool row in one batch, and the SPEC §3 rules (greedy pick: part-type
    cap, one SKU per variant group) walk the pool in model order. A user whose
    pool yields fewer than N picks is re-ranked over every candidate of the
    level, then falls back to the next level, as the Recommender does. Users
    without any signal share one pass per vehicle.

    ``users`` must carry the :func:`models.features.user_states` columns
    (features and packed signals at the run's ``as_of``).
    """

    def __init__(self, catalog: CatalogArrays, popularity: PopularityIndex, config: RecsConfig,
                 model: RankerModel, items: ItemTable, fconfig: FeatureConfig,
                 drift: Optional[DriftCounts] = None, drift_every: int = 20):
        super().__init__(catalog, popularity, config)
        model.check_features(config)
        self.model = model
        self.items = items
        self.builder = PoolBuilder(catalog, config, fconfig)
        self.drift = drift
        self.drift_every = max(1, int(drift_every))
        self.rows_scored = 0

    def _score(self, users: pd.DataFrame, pools: Pools, cand: np.ndarray, levels,
               stands_for: Optional[np.ndarray] = None) -> np.ndarray:
        """Model scores of pool rows; every ``drift_every``-th row feeds the drift counts.

        ``stands_for`` is, per user row, how many users it represents (the
        cold-user representative stands for all of them), so drift compares
        the same population as the training distribution.
        """
        x = self.builder.matrix(users, pools, cand, levels, self.items)
        if self.drift is not None and len(x):
            weights = None if stands_for is None else stands_for[pools.row][::self.drift_every]
            self.drift.add(x[::self.drift_every], self.model.features, weights)
        self.rows_scored += len(x)
        return self.model.predict(x)

    def recommend(self, users: pd.DataFrame, fitting: np.ndarray) -> Picks:
        n = self.config.rules.recs_per_user
        count = len(users)
        items = np.full((count, n), -1, dtype=np.int64)
        scores = np.zeros((count, n))
        source = np.full(count, None, dtype=object)
        cand = self.candidates(fitting)
        if not len(cand) or not count:
            return Picks(source != None, items, scores, source)  # noqa: E711
        cold = _cold(users)
        warm = np.flatnonzero(~cold)
        if cold.sum() > 1:
            # One representative stands for every cold user of the vehicle.
            subset = users.iloc[np.r_[warm, np.flatnonzero(cold)[:1]]].reset_index(drop=True)
        else:
            cold[:] = False
            warm = np.arange(count)
            subset = users.reset_index(drop=True)
        levels, pools = self.builder.build(subset, cand, self.popularity)
        stands_for = np.ones(len(subset))
        if cold.any():
            stands_for[-1] = cold.sum()
        score = self._score(subset, pools, cand, levels, stands_for)
        part_type = self.catalog.part_type[cand]
        variant = self.catalog.variant_key[cand]
        order = np.lexsort((levels.rank[pools.level, pools.item], -score, pools.row))
        starts = np.searchsorted(pools.row[order], np.arange(len(subset) + 1))
        for r in range(len(subset)):
            rows = order[starts[r]:starts[r + 1]]
            picked = greedy_pick(pools.item[rows], part_type, variant, n,
                                 self.config.rules.max_per_part_type)
            level = int(pools.level[rows[0]]) if len(rows) else -1
            if len(picked) == n:
                where = {int(item): i for i, item in enumerate(pools.item[rows])}
                chosen = (np.array(picked), score[rows][[where[p] for p in picked]], level)
            else:
                chosen = self._fallback(subset.iloc[[r]], cand, levels, level, part_type,
                                        variant, n, stands_for[r])
            if chosen is None:
                continue
            targets = [warm[r]] if r < len(warm) else np.flatnonzero(cold)
            for u in targets:
                items[u] = cand[chosen[0]]
                scores[u] = chosen[1]
                source[u] = levels.names[chosen[2]]
        return Picks(source != None, items, scores, source)  # noqa: E711

    def _fallback(self, user: pd.DataFrame, cand: np.ndarray, levels, level: int,
                  part_type: np.ndarray, variant: np.ndarray, n: int, stands_for: float = 1.0):
        """Every candidate of the level re-ranked; then the next usable levels (rule 12 kept).

        A level below the last usable one serves only if at least ``n`` of its
        observed candidates are not bought by the user, as in the Recommender.
        """
        user = user.reset_index(drop=True)
        bought = self.builder.user_pairs(user, cand, "bought")
        viewed = self.builder.user_pairs(user, cand, "viewed")
        carted = self.builder.user_pairs(user, cand, "carted")
        intent = (np.concatenate([viewed[0], carted[0]]), np.concatenate([viewed[1], carted[1]]))
        usable = np.flatnonzero(levels.usable)
        start = level if level >= 0 else int(usable[0])
        for lvl in usable[usable >= start]:
            excluded = int(levels.observed[lvl][bought[1]].sum())
            if lvl != usable[-1] and levels.support[lvl] - excluded < n:
                continue
            pools = candidate_pools(levels, np.array([lvl]), len(cand), bought, intent)
            if not len(pools.row):
                continue
            score = self._score(user, pools, cand, levels, np.array([stands_for]))
            ranked = np.lexsort((levels.rank[pools.level, pools.item], -score))
            picked = greedy_pick(pools.item[ranked], part_type, variant, n,
                                 self.config.rules.max_per_part_type)
            if len(picked) == n:
                where = {int(item): i for i, item in enumerate(pools.item[ranked])}
                return (np.array(picked), score[ranked][[where[p] for p in picked]], int(lvl))
        return None
