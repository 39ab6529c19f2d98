"""Tests for models.catalog: deterministic conflict resolution, eligibility, the SKU arrays."""
import pandas as pd
import pytest

from models import contracts
from models.catalog import (CatalogArrays, https_mask, ineligibility_reasons, is_image_url,
                            is_low_value, low_value_mask, resolve_conflicts, service_sku_mask)
from models.config import RulesConfig

RULES = RulesConfig()


def row(sku, part_type="Header", price=100.0, image_url="https://img/x.jpg", tags=(),
        is_universal=False, variant_group=None, title="t", brand="Acme"):
    return {"sku": sku, "title": title, "part_type": part_type, "brand": brand,
            "price": price, "image_url": image_url, "tags": tuple(tags),
            "is_universal": is_universal, "variant_group": variant_group}


def frame(*rows):
    return pd.DataFrame(list(rows))


# --- resolve_conflicts ---------------------------------------------------------------

CONFLICTED = [
    row("A"), row("A"),                                            # identical duplicate
    row("B", "Intake"), row("B", "Header"), row("B", "Exhaust"),   # 3-way part-type conflict
    row("C", price=120.0), row("C", price=110.0),                  # same type, other fields
    row("D", "Turbo"),
    row("E", "Seat", title="x"), row("E", "Seat", title="x"), row("E", "Mirror"),
]


def test_resolve_keeps_one_row_per_sku():
    res = resolve_conflicts(frame(*CONFLICTED))
    assert res.catalog["sku"].tolist() == ["A", "B", "C", "D", "E"]
    # the first part type in sort order wins: Exhaust < Header < Intake, Mirror < Seat
    kept = dict(zip(res.catalog["sku"], res.catalog["part_type"]))
    assert kept == {"A": "Header", "B": "Exhaust", "C": "Header", "D": "Turbo", "E": "Mirror"}


def test_identical_duplicates_are_counted_not_reported():
    res = resolve_conflicts(frame(*CONFLICTED))
    assert res.duplicates == 2  # one extra A, one extra E/Seat
    assert "A" not in set(res.conflicts["sku"])


def test_conflicts_reported_with_kept_part_type():
    res = resolve_conflicts(frame(*CONFLICTED))
    by_sku = res.conflicts.groupby("sku").size().to_dict()
    assert by_sku == {"B": 2, "C": 1, "E": 1}
    b = res.conflicts.loc[res.conflicts["sku"] == "B"]
    assert sorted(b["part_type"]) == ["Header", "Intake"]
    for reason in b["reason"]:
        assert reason.startswith("catalogue conflict: sku B")
        assert reason.endswith("kept 'Exhaust'")
    e = res.conflicts.loc[res.conflicts["sku"] == "E", "reason"].iloc[0]
    assert "part_type 'Seat'" in e and "kept 'Mirror'" in e
    # every row read is accounted for
    assert len(res.catalog) + res.duplicates + len(res.conflicts) == len(CONFLICTED)


@pytest.mark.parametrize("seed", range(8))
def test_resolution_independent_of_row_order(seed):
    base = resolve_conflicts(frame(*CONFLICTED))
    shuffled = frame(*CONFLICTED).sample(frac=1.0, random_state=seed)
    other = resolve_conflicts(shuffled)
    pd.testing.assert_frame_equal(other.catalog.reset_index(drop=True),
                                  base.catalog.reset_index(drop=True))
    pd.testing.assert_frame_equal(other.conflicts.reset_index(drop=True),
                                  base.conflicts.reset_index(drop=True))
    assert other.duplicates == base.duplicates


def test_resolve_clean_catalogue_is_untouched():
    clean = frame(row("B"), row("A", "Intake"))
    res = resolve_conflicts(clean)
    assert res.duplicates == 0 and len(res.conflicts) == 0
    assert res.catalog["sku"].tolist() == ["A", "B"]
    assert "reason" in res.conflicts.columns


def test_resolve_empty():
    res = resolve_conflicts(frame(row("A")).iloc[:0])
    assert len(res.catalog) == 0 and res.duplicates == 0 and len(res.conflicts) == 0


# --- ineligibility_reasons -------------------------------------------------------------

@pytest.mark.parametrize("r, reason", [
    (row("P50", price=50.0), None),                     # boundary passes (rule 1: >= 50)
    (row("P4999", price=49.99), "price below 50"),
    (row("PNAN", price=float("nan")), "price below 50"),
    (row("REF", tags=("refurbished",)), "excluded tag"),
    (row("OK-TAG", tags=("performance",)), None),
    (row("SVC-OIL"), "service SKU"),
    (row("svc-lower"), "service SKU"),                  # case-insensitive
    (row("INSTALL-1"), "service SKU"),
    (row("WARRANTY-3Y"), "service SKU"),
    (row("MY-SVC-1"), None),                            # prefix pattern only
    (row("HTTP", image_url="http://img/x.jpg"), "image URL not https"),
    (row("NOURL", image_url=None), "image URL not https"),
    (row("BARE", image_url="https://"), "image URL not https"),
    (row("UPPER", image_url="HTTPS://IMG/X.JPG"), None),
    (row("GASKET", part_type="Exhaust Gasket"), "low-value part type"),
    (row("BOLTS", part_type="Wheel Bolt Set"), "low-value part type"),
    (row("DECAL", part_type="Decal"), "low-value part type"),
    (row("CLAMP", part_type="Hose Clamp"), "low-value part type"),
    (row("EBK", part_type="Engine Bolt Kit"), None),    # listed exception
    (row("EBK2", part_type="  engine bolt kit "), None),
    (row("DCAP", part_type="Distributor Cap"), None),   # listed exception
    (row("GCAP", part_type="Gas Cap"), "low-value part type"),
])
def test_each_eligibility_rule(r, reason):
    assert ineligibility_reasons(frame(r), RULES).tolist() == [reason]


def test_first_failing_rule_is_reported():
    r = row("SVC-1", price=10.0, tags=("refurbished",), image_url="http://x")
    assert ineligibility_reasons(frame(r), RULES).tolist() == ["price below 50"]


def test_rules_follow_configuration():
    rules = RulesConfig(min_price=20.0, service_sku_patterns=("LAB-*",),
                        excluded_tags=("open-box",), low_value_keywords=("mat",),
                        low_value_exceptions=())
    f = frame(row("A", price=25.0), row("SVC-1"), row("LAB-1"), row("B", tags=("open-box",)),
              row("C", part_type="Floor Mat"), row("D", part_type="Gasket"))
    assert ineligibility_reasons(f, rules).tolist() == [
        None, None, "service SKU", "excluded tag", "low-value part type", None]
    assert ineligibility_reasons(frame(row("A", price=25.0)), RulesConfig(min_price=30)
                                 ).tolist() == ["price below 30"]


def test_predicates():
    skus = pd.Series(["service-12", "SERV-1", "svc-9", None, "XSVC-1"])
    assert service_sku_mask(skus, RULES).tolist() == [True, False, True, False, False]
    urls = pd.Series(["https://a/b.png", None, "ftp://a/b.png", "HTTPS://A/B.PNG", "https://"])
    assert https_mask(urls).tolist() == [True, False, False, True, False]
    types = pd.Series(["Valve Cover Gasket", "Engine Bolt Kit", None, "Intake"])
    assert low_value_mask(types, RULES).tolist() == [True, False, False, False]
    assert is_low_value("Valve Cover Gasket", RULES)
    assert not is_low_value("Cold Air Intake", RULES)


# --- CatalogArrays --------------------------------------------------------------------

def _arrays():
    f = frame(row("RA003R", "Mirror", variant_group="RA003"),
              row("IGN-COIL-100", "Ignition Coil"),
              row("RA003B", "Mirror", variant_group="RA003"),
              row("IGN-COIL-100HO", "Ignition Coil"),
              row("CHEAP", price=10.0, image_url=None),
              row("UNI", "Floor Mat", is_universal=True))
    return CatalogArrays.build(f, RULES)


def test_arrays_sorted_by_sku_and_aligned():
    a = _arrays()
    assert a.sku.tolist() == sorted(a.sku.tolist())
    assert len(a) == 6
    i = int(a.index_of(["CHEAP"])[0])
    assert a.price[i] == 10.0 and not a.eligible[i] and a.image_url[i] == ""
    u = int(a.index_of(["UNI"])[0])
    assert a.is_universal[u] and a.part_type[u] == "Floor Mat" and a.eligible[u]
    assert a.eligible.sum() == 5


def test_index_of_unknown_is_minus_one():
    a = _arrays()
    idx = a.index_of(["UNI", "NOPE", "RA003B", "", "ZZZ", "AAA"])
    assert idx[1] == -1 and idx[3] == -1 and idx[4] == -1 and idx[5] == -1
    assert a.sku[idx[0]] == "UNI" and a.sku[idx[2]] == "RA003B"
    assert a.index_of([]).tolist() == []
    empty = CatalogArrays.build(frame(row("A")).iloc[:0], RULES)
    assert empty.index_of(["A"]).tolist() == [-1]


def test_variant_key_groups_colours_and_keeps_specialised_variants_apart():
    a = _arrays()
    key = dict(zip(a.sku, a.variant_key))
    assert key["RA003B"] == key["RA003R"]
    # a specialised variant has no group: it is its own key, distinct from its base SKU
    assert key["IGN-COIL-100HO"] == "IGN-COIL-100HO"
    assert key["IGN-COIL-100"] == "IGN-COIL-100"
    assert key["IGN-COIL-100HO"] != key["IGN-COIL-100"]
    # a group name never collides with a SKU of the same text
    g = CatalogArrays.build(frame(row("RA003"), row("RA003B", variant_group="RA003")), RULES)
    assert g.variant_key[0] != g.variant_key[1]


def test_build_is_order_independent():
    f = frame(row("B"), row("A", "Intake"), row("C", price=10.0))
    a1 = CatalogArrays.build(f, RULES)
    a2 = CatalogArrays.build(f.iloc[::-1], RULES)
    for field in ("sku", "price", "part_type", "variant_key", "eligible"):
        assert getattr(a1, field).tolist() == getattr(a2, field).tolist()


# --- #13: padded SKUs and rule 7 -------------------------------------------------------

def test_padded_duplicate_sku_no_longer_wins_the_catalogue_conflict():
    """A padded " AA001R " with another part type was stripped into AA001R and, its part type
    sorting first, replaced the genuine row; now validation refuses it before resolution."""
    genuine = dict(row("AA001R", "Mirror"), tags=[])
    padded = dict(row(" AA001R ", "Air Filter"), tags=[])
    checked = contracts.validate("catalog", contracts.records_frame("catalog", [genuine, padded]))
    assert checked.bad_positions.tolist() == [1]
    assert checked.bad_reasons.tolist() == ["padded sku"]
    resolved = resolve_conflicts(checked.rows)
    assert resolved.catalog[["sku", "part_type"]].values.tolist() == [["AA001R", "Mirror"]]
    assert len(resolved.conflicts) == 0
    # the control: had the padded row reached resolution as AA001R, it would have won
    stripped = resolve_conflicts(frame(row("AA001R", "Mirror"), row("AA001R", "Air Filter")))
    assert stripped.catalog["part_type"].tolist() == ["Air Filter"]


HOSTILE_IMAGE_URLS = [
    "https:///x", "https://", 'https://x/a.jpg" onerror="alert(1)', "https://x/a.jpg'",
    "https://x/a b.jpg", " https://x/a.jpg", "https://x/<script>", "https://x/a.jpg\x00",
    "https://x/\x1b[31m.jpg", "https://x\\evil/a.jpg", "https://-x-/a.jpg",
    "https://x/caf\u00e9.jpg", "https://x:port/a.jpg", "http://img/a.jpg", "//img/a.jpg",
    "javascript:alert(1)", "", None, 42,
]


@pytest.mark.parametrize("url", HOSTILE_IMAGE_URLS)
def test_rule_7_refuses_urls_that_are_not_safe_https(url):
    assert not is_image_url(url)
    assert https_mask(pd.Series([url], dtype=object)).tolist() == [False]
    assert ineligibility_reasons(frame(row("A", image_url=url)), RULES).tolist() == [
        "image URL not https"]


@pytest.mark.parametrize("url", [
    "https://img/x.jpg", "https://cdn.example.com/p/AA001R.jpg?w=600&h=400#main",
    "HTTPS://CDN.EXAMPLE.COM/A.PNG", "https://img.example.com:8443/a%20b.jpg",
    "https://xn--caf-dma.example/a.jpg", "https://img.example.com"])
def test_rule_7_accepts_real_https_image_urls(url):
    assert is_image_url(url)
    assert ineligibility_reasons(frame(row("A", image_url=url)), RULES).tolist() == [None]


def test_rule_7_is_one_predicate_for_eligibility_and_qa():
    """The QA check re-derives rule 7 from the output with the very predicate eligibility uses."""
    import models.rules as rules
    assert rules.https_mask is https_mask
