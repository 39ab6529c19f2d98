"""docs/own-data.md, followed literally: a small shop's CSV exports → contract files → config →
batch run → dead letters and gates → backtest.

The code blocks are taken from the page itself (``python title=…``/``yaml title=…`` blocks are
written to their file, ``bash`` blocks are run), so a page that stops working fails here.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pytest

from models.contracts import parse_rfc3339

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "own-data.md")
BLOCK = re.compile(r"```(\w+)(?: title=(\S+))?\n(.*?)```", re.S)
AS_OF = "2026-06-01T00:00:00Z"


def doc_blocks():
    """(language, title, body) of every fenced block of the page, in order."""
    with open(DOC, encoding="utf-8") as handle:
        return BLOCK.findall(handle.read())


def write_exports(folder: str, seed: int = 3) -> None:
    """The page's three CSV exports: a home-and-garden shop whose four regions buy differently."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder)
    categories = ["seeds", "soil", "tools", "furniture", "lighting", "planters", "hoses", "bbq"]
    products = pd.DataFrame({
        "product_id": [f"HG{i:03d}" for i in range(80)],
        "name": [f"product {i}" for i in range(80)],
        "category": [categories[i % len(categories)] for i in range(80)],
        "brand": [f"brand {i % 7}" for i in range(80)],
        "unit_price": np.round(rng.uniform(6, 240, 80), 2),
        "image": [f"https://img.shop.example/p/HG{i:03d}.jpg" for i in range(80)],
    })
    # Things the page's configuration keeps out of e-mails: a gift card and a sample bag.
    products.loc[78, ["product_id", "category"]] = ["GIFTCARD-50", "gift cards"]
    products.loc[79, ["category", "unit_price"]] = ["sample bag", 9.0]
    products.to_csv(os.path.join(folder, "products.csv"), index=False)
    regions, tiers = ["north", "south", "east", "west"], ["bronze", "silver", "gold"]
    n_users = 400
    customers = pd.DataFrame({
        "customer_id": [f"C{i:04d}" for i in range(n_users)],
        "email": [f"Customer.{i}@Shop.example" for i in range(n_users)],
        "region": [regions[i % 4] for i in range(n_users)],
        "tier": [tiers[(i // 4) % 3] for i in range(n_users)],
        "signed_up": ["2025-01-01 00:00:00"] * n_users,
    })
    customers.to_csv(os.path.join(folder, "customers.csv"), index=False)
    # Each region favours its own 20 products; 2026-01-01 .. 2026-06-28 (the holdout is June).
    start = pd.Timestamp("2026-01-01")
    lines = []
    for order in range(3000):
        user = int(rng.integers(n_users))
        region = user % 4
        when = start + pd.Timedelta(seconds=int(rng.integers(0, 178 * 86400)))
        for line_no in range(int(rng.integers(1, 4))):
            favourite = rng.random() < 0.8
            product = (region * 20 + int(rng.integers(20))) if favourite else int(rng.integers(78))
            lines.append({"order_id": f"O{order:05d}", "line_no": line_no + 1,
                          "customer_id": f"C{user:04d}",
                          "product_id": products.product_id[product],
                          "qty": int(rng.integers(1, 4)),
                          "unit_price": products.unit_price[product],
                          "ordered_at": when.strftime("%Y-%m-%d %H:%M:%S")})
    pd.DataFrame(lines).to_csv(os.path.join(folder, "orders.csv"), index=False)


def run_doc_command(line: str, cwd: str) -> subprocess.CompletedProcess:
    """One ``python ...`` line of the page, run with this interpreter in the shop's folder."""
    argv = shlex.split(line)
    assert argv[0] == "python", line
    return subprocess.run([sys.executable] + argv[1:], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The page's steps 1 and 2 done in a fresh folder: exports, conversion, config file."""
    folder = str(tmp_path_factory.mktemp("own_shop"))
    write_exports(os.path.join(folder, "exports"))
    for language, title, body in doc_blocks():
        if title:
            with open(os.path.join(folder, title), "w", encoding="utf-8") as handle:
                handle.write(body)
    convert = subprocess.run([sys.executable, "convert.py"], cwd=folder, capture_output=True,
                             text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    return folder


def commands():
    """Every ``bash`` line of the page, in order."""
    return [line for language, _, body in doc_blocks() if language == "bash"
            for line in body.splitlines() if line.strip()]


def test_the_page_has_every_step():
    titles = [title for _, title, _ in doc_blocks() if title]
    assert titles == ["convert.py", "shop.yaml"]
    jobs = [shlex.split(c)[2] for c in commands() if c.startswith("python -m")]
    assert jobs == ["models.config_file", "pipelines.batch_recommendations", "pipelines.backtest"]


def read_lines(path: str) -> pd.DataFrame:
    with open(path, encoding="utf-8") as handle:
        return pd.DataFrame([json.loads(line) for line in handle])


def test_conversion_gives_the_contract(shop):
    events = read_lines(os.path.join(shop, "shop", "events.jsonl"))
    holdout = read_lines(os.path.join(shop, "shop", "holdout_events.jsonl"))
    assert len(events) and len(holdout) and set(events.event_name) == {"Ordered Product"}
    assert all(parse_rfc3339(t) is not None for t in events.event_time)  # offset included
    assert events.event_time.max() < AS_OF <= holdout.event_time.min()
    assert pd.concat([events, holdout]).event_id.is_unique
    users = read_lines(os.path.join(shop, "shop", "users.jsonl"))
    assert {"user_id", "email", "region", "tier"} <= set(users.columns) and len(users) == 400


def test_following_the_page_publishes_and_backtests(shop):
    check, batch, dead_letters, gates, backtest = commands()
    result = run_doc_command(check, shop)
    assert result.returncode == 0, result.stderr
    assert "region" in result.stdout

    result = run_doc_command(batch, shop)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PUBLISHED" in result.stdout
    assert "served by level: region+tier" in result.stdout
    recs = duckdb.connect(os.path.join(shop, "shop.duckdb"), read_only=True).sql(
        "SELECT * FROM recommendations").df()
    assert len(recs) == 400 and recs.email_lower.str.islower().all()
    parts = recs[[f"rec_part_{i}" for i in range(1, 5)]].to_numpy().ravel()
    assert "GIFTCARD-50" not in parts and "HG079" not in parts  # the page's rules hold
    # The four regions get different lists: segments, not one global list.
    region = recs.segment.str.split("|").str[0]
    assert recs.rec_part_1.groupby(region).agg(lambda s: s.mode()[0]).nunique() == 4

    for line in (dead_letters, gates):  # the page's two look-ups run and answer
        result = subprocess.run(line, shell=True, cwd=shop, capture_output=True, text=True,
                                executable="/bin/bash",
                                env={**os.environ, "PATH": os.path.dirname(sys.executable)
                                     + os.pathsep + os.environ["PATH"]})
        assert result.returncode == 0, result.stderr

    result = run_doc_command(backtest, shop)
    assert result.returncode == 0, result.stderr
    assert "precision@4" in result.stdout


def test_a_config_mistake_is_one_line(shop):
    with open(os.path.join(shop, "bad.yaml"), "w") as handle:
        handle.write("rules:\n  min_prce: 5\n")
    result = subprocess.run([sys.executable, "-m", "models.config_file", "bad.yaml"], cwd=shop,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "rules.min_price" in message[0]


def test_an_export_run_without_as_of_is_stopped_by_the_stale_history_gate(shop):
    """Step 3's warning: on an export, the current time as --as_of decays every score."""
    batch = next(c for c in commands() if "pipelines.batch_recommendations" in c)
    argv = shlex.split(batch)
    at = argv.index("--as_of")
    del argv[at:at + 2]
    argv[argv.index("--warehouse") + 1] = "no_as_of.duckdb"
    result = subprocess.run([sys.executable] + argv[1:], cwd=shop, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stale_history" in result.stdout and "--as_of" in result.stdout
    with duckdb.connect(os.path.join(shop, "no_as_of.duckdb"), read_only=True) as con:
        assert con.execute("SELECT status FROM pipeline_runs").fetchall() == [("gated",)]
        tripped = con.execute("SELECT name FROM qa_checks WHERE violations > 0").fetchall()
    assert ("gate: stale_history",) in tripped
