"""Benchmark of the bandit in the loop on simulated worlds with known truth (issue #18).

    python bench/bandit.py                  # 200 seeds per scenario
    python bench/bandit.py --seeds 20       # quick look
    python bench/bandit.py --scenarios views_floor_0.005   # one scenario, the others kept

Each seed draws a world of 24 treatments with known click rates and runs the
product's loop for 14 daily periods: each day the allocation is the bandit's
(`models.bandit`: Beta posteriors over the last 7 days, P(best) by Monte
Carlo, 2% exploration floor), every send's treatment comes from
`models.allocation.choose` with its propensity logged, and clicks are drawn
from the true rates. From the truth it reports:

* regret: expected clicks per send of the bandit against the uniform-random
  allocation and against always sending the best treatment;
* off-policy evaluation (`models.ope`) of three fixed candidate policies —
  uniform, greedy and Thompson, both learned from a separate pilot of 2,000
  uniform sends — from the bandit's own logs: bias, RMSE and how often the
  95% bootstrap interval covers the true value (IPS, SNIPS, DR);
* the realised lift per send over uniform random, estimated from the same
  logs with its interval (the figure the field quoted as 0.39% vs 0.25%),
  and how often that interval covers the true lift of the sends made.

Scenarios: ``views`` (click-through among views, 7.4% on average, 400
views a day: the field's 5,598 views over 14 days), ``per_send``
(click-through per send, 0.25% on average under random, 4,000 sends a day)
and ``views_floor_0.005`` (``views`` with a 0.5% exploration floor instead of
the default 2%, which reserves 24 x 2% = 48% of the sends for exploration).

Every timing records wall and CPU seconds and the load average before and after:
the machine is shared. Results: bench/results/bandit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from models import allocation, bandit, ope  # noqa: E402

RESULTS = os.path.join(HERE, "results", "bandit.json")
ARMS, DAYS, WINDOW_DAYS, FLOOR, PILOT = 24, 14, 7, 0.02, 2_000
SCENARIOS = {
    "views": {"mean_rate": 0.074, "sigma": 0.35, "per_day": 400},
    "per_send": {"mean_rate": 0.0025, "sigma": 0.5, "per_day": 4_000},
    # The default floor reserves 24 x 2% = 48% of sends for exploration; a lower one:
    "views_floor_0.005": {"mean_rate": 0.074, "sigma": 0.35, "per_day": 400, "floor": 0.005},
}
POLICIES = ("uniform", "greedy", "thompson")


def world(rng: np.random.Generator, mean_rate: float, sigma: float) -> np.ndarray:
    """True click rates of the arms: lognormal spread around `mean_rate` (their plain mean)."""
    z = rng.lognormal(0.0, sigma, ARMS)
    return np.clip(z / z.mean() * mean_rate, 1e-5, 0.99)


def run_seed(seed: int, mean_rate: float, sigma: float, per_day: int, resamples: int,
             floor: float = FLOOR) -> Dict:
    rng = np.random.default_rng(seed)
    p = world(rng, mean_rate, sigma)
    config = bandit.BanditConfig(exploration_floor=floor, draws=4_000, seed=seed)
    names = np.array([f"T{i + 1:02d}" for i in range(ARMS)], dtype=object)
    index = {n: i for i, n in enumerate(names)}
    daily_sends = np.zeros((DAYS, ARMS))
    daily_clicks = np.zeros((DAYS, ARMS))
    arms, props, rewards = [], [], []
    for day in range(DAYS):
        lo = max(0, day - WINDOW_DAYS)
        n = daily_sends[lo:day].sum(axis=0)
        c = daily_clicks[lo:day].sum(axis=0)
        post = bandit.posterior(n, c, config)
        weights = bandit.allocation_weights(
            bandit.prob_best(post.alpha, post.beta, config.draws, config.seed + day), floor)
        table = pd.DataFrame({"allocation_version": f"s{seed}d{day}", "segment": "*",
                              "treatment_id": names, "weight": weights})
        users = [f"U{seed}-{day}-{i}" for i in range(per_day)]
        chosen, prop = allocation.choose_many(users, table, seed)
        a = np.fromiter((index[t] for t in chosen), np.intp, per_day)
        r = (rng.random(per_day) < p[a]).astype(float)
        np.add.at(daily_sends[day], a, 1)
        np.add.at(daily_clicks[day], a, r)
        arms.append(a)
        props.append(prop)
        rewards.append(r)
    a, prop, r = np.concatenate(arms), np.concatenate(props), np.concatenate(rewards)
    cells = pd.DataFrame({"a": a, "p": prop, "r": r}).value_counts().reset_index()
    log = ope.make_log(cells["a"], cells["p"], cells["r"], cells["count"], ARMS)
    n_sends = len(a)
    bandit_rate = float(p[a].mean())           # expected clicks per send of the sends made

    # Candidate policies, fixed before the evaluation: learned from a separate uniform pilot.
    pilot = rng.integers(0, ARMS, PILOT)
    pilot_r = (rng.random(PILOT) < p[pilot]).astype(float)
    alpha = 1 + np.bincount(pilot, weights=pilot_r, minlength=ARMS)
    beta = 1 + np.bincount(pilot, minlength=ARMS) - (alpha - 1)
    policies = ope.candidate_policies(alpha, beta, draws=4_000, seed=seed)
    ope_rows = {}
    for name, pi in policies.items():
        truth = float(pi @ p)
        est = ope.estimate(log, pi, ARMS, resamples=resamples, seed=seed)
        ope_rows[name] = {"truth": truth, **{m: list(e) for m, e in est.items()}}
    lift = ope.lift(log, ope.uniform_policy(ARMS), ARMS, resamples=resamples, seed=seed)
    realised = float(r.mean())
    return {
        "seed": seed, "sends": n_sends, "clicks": int(r.sum()),
        "rate_best": float(p.max()), "rate_uniform": float(p.mean()),
        "rate_bandit": bandit_rate, "rate_realised": realised,
        "lift_true": bandit_rate - float(p.mean()), "lift": list(lift),
        "share_to_best": float((a == p.argmax()).mean()), "ope": ope_rows,
    }


def summarise(rows: List[Dict]) -> Dict:
    def stats(values):
        v = np.asarray(values, float)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}

    out = {
        "seeds": len(rows),
        "sends_per_seed": rows[0]["sends"],
        "rate_per_send": {k: stats([r[f"rate_{k}"] for r in rows])
                          for k in ("best", "uniform", "bandit", "realised")},
        "regret_per_send_vs_best": stats([r["rate_best"] - r["rate_bandit"] for r in rows]),
        "gain_per_send_vs_uniform": stats([r["rate_bandit"] - r["rate_uniform"] for r in rows]),
        "share_of_best_achieved": stats([(r["rate_bandit"] - r["rate_uniform"])
                                         / (r["rate_best"] - r["rate_uniform"]) for r in rows]),
        "share_of_sends_to_best": stats([r["share_to_best"] for r in rows]),
        "lift_vs_uniform_snips": {
            "estimate": stats([r["lift"][0] for r in rows]),
            "true": stats([r["lift_true"] for r in rows]),
            "bias": float(np.mean([r["lift"][0] - r["lift_true"] for r in rows])),
            "interval_width": stats([r["lift"][2] - r["lift"][1] for r in rows]),
            "coverage": float(np.mean([r["lift"][1] <= r["lift_true"] <= r["lift"][2]
                                       for r in rows])),
            "interval_excludes_zero": float(np.mean([r["lift"][1] > 0 for r in rows])),
        },
        "ope": {},
    }
    for name in POLICIES:
        truth = np.array([r["ope"][name]["truth"] for r in rows])
        out["ope"][name] = {"true_value": stats(truth)}
        for m in ope.METHODS:
            est = np.array([r["ope"][name][m] for r in rows])   # value, low, high
            err = est[:, 0] - truth
            out["ope"][name][m] = {
                "bias": float(np.nanmean(err)), "rmse": float(np.sqrt(np.nanmean(err ** 2))),
                "relative_bias": float(np.nanmean(err) / truth.mean()),
                "coverage_95": float(np.mean((est[:, 1] <= truth) & (truth <= est[:, 2]))),
                "interval_width": float(np.nanmean(est[:, 2] - est[:, 1])),
            }
    example = rows[0]
    out["example_seed"] = {
        "seed": example["seed"], "sends": example["sends"], "clicks": example["clicks"],
        "realised_rate": example["rate_realised"], "uniform_true_rate": example["rate_uniform"],
        "lift_snips": example["lift"], "lift_true": example["lift_true"]}
    return out


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="Comma-separated scenarios to run; the others keep their "
                             "results already in --out.")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    previous = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as handle:
            previous = json.load(handle).get("scenarios", {})
    results = {"what": "bench/bandit.py: regret, OPE bias/coverage and realised lift on "
                       "simulated worlds with known truth",
               "arms": ARMS, "days": DAYS, "window_days": WINDOW_DAYS,
               "default_exploration_floor": FLOOR, "pilot_sends": PILOT,
               "resamples": args.resamples, "python": platform.python_version(),
               "scenarios": {k: v for k, v in previous.items() if k in SCENARIOS}}
    for name in chosen:
        scenario = SCENARIOS[name]
        load_before, wall, cpu = loadavg(), time.perf_counter(), time.process_time()
        rows = [run_seed(seed, resamples=args.resamples, **scenario)
                for seed in range(args.seeds)]
        summary = summarise(rows)
        summary.update(scenario=scenario, wall_seconds=round(time.perf_counter() - wall, 2),
                       cpu_seconds=round(time.process_time() - cpu, 2),
                       load_before=load_before, load_after=loadavg())
        results["scenarios"][name] = summary
        s = summary
        print(f"{name}: {s['seeds']} seeds x {s['sends_per_seed']:,} sends; per send: best "
              f"{s['rate_per_send']['best']['mean']:.4%}, bandit "
              f"{s['rate_per_send']['bandit']['mean']:.4%}, uniform "
              f"{s['rate_per_send']['uniform']['mean']:.4%}; lift coverage "
              f"{s['lift_vs_uniform_snips']['coverage']:.2f}; "
              f"{s['wall_seconds']} s wall, {s['cpu_seconds']} s CPU")
        for policy in POLICIES:
            o = s["ope"][policy]
            print("   " + policy + ": " + ", ".join(
                f"{m} bias {o[m]['bias']:+.5f} cover {o[m]['coverage_95']:.2f}"
                for m in ope.METHODS))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
