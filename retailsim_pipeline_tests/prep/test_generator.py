"""The generator writes the exact LGSR format, deterministically, with learnable planted structure."""

import dataclasses
import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from retailsim_pipeline.config import GeneratorConfig, generator_preset
from retailsim_pipeline.prep import generator as gen
from retailsim_pipeline.prep.generator import GenerationSummary, generate
from retailsim_pipeline.prep.ground_truth import load_world, measure_recall
from retailsim_pipeline.prep.schema import (
    CODE_SETS,
    ID_PATTERNS,
    LGSR_COLUMNS,
    lgsr_weekday,
    week_code,
    week_monday,
    weekly_file_name,
)

BASKET_COLUMNS = [
    "SHOP_WEEK", "SHOP_DATE", "SHOP_WEEKDAY", "SHOP_HOUR", "CUST_CODE", "CUST_PRICE_SENSITIVITY",
    "CUST_LIFESTAGE", "BASKET_SIZE", "BASKET_PRICE_SENSITIVITY", "BASKET_TYPE", "BASKET_DOMINANT_MISSION",
    "STORE_CODE", "STORE_FORMAT", "STORE_REGION",
]
XX_LABELS = ["BASKET_PRICE_SENSITIVITY", "BASKET_TYPE", "BASKET_DOMINANT_MISSION"]


def read_raw(files: list[Path]) -> pl.DataFrame:
    """All rows as strings (what is really in the file), plus the file's position."""
    return pl.concat(
        [
            pl.read_csv(f, infer_schema=False).with_columns(pl.lit(i).alias("file_index"))
            for i, f in enumerate(files)
        ]
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, GenerationSummary]:
    root = tmp_path_factory.mktemp("tiny")
    return root, generate(generator_preset("tiny"), root)


@pytest.fixture(scope="module")
def rows(tiny) -> pl.DataFrame:
    _, summary = tiny
    return read_raw(summary.files)


@pytest.fixture(scope="module")
def typed(rows) -> pl.DataFrame:
    return rows.with_columns(
        pl.col("SHOP_WEEK", "SHOP_DATE", "SHOP_WEEKDAY", "SHOP_HOUR", "QUANTITY").cast(pl.Int64),
        pl.col("BASKET_ID").cast(pl.Int64),
        pl.col("SPEND").cast(pl.Float64),
    )


@pytest.fixture(scope="module")
def baskets(typed) -> pl.DataFrame:
    return typed.group_by("BASKET_ID", maintain_order=True).agg(
        pl.len().alias("lines"),
        pl.col("SPEND").sum().alias("spend"),
        *(pl.col(c).first() for c in BASKET_COLUMNS),
    )


# ---- format ------------------------------------------------------------------------------------


def test_files_named_by_week_with_exact_header(tiny):
    root, summary = tiny
    cfg = generator_preset("tiny")
    expected = [root / "raw" / weekly_file_name(week_code(i)) for i in range(cfg.n_weeks)]
    assert summary.files == expected
    assert summary.files[0].name == "transactions_200607.csv"
    assert sorted((root / "raw").iterdir()) == expected  # nothing else, no temporary files left
    header = ",".join(LGSR_COLUMNS)
    for f in summary.files:
        first = f.read_text().split("\n", 1)[0]
        assert first == header
        assert len(first.split(",")) == 22


def test_week_codes_and_dates(typed, tiny):
    _, summary = tiny
    assert week_monday(200607) == dt.date(2006, 4, 10)
    per_file = typed.group_by("file_index").agg(
        pl.col("SHOP_WEEK").unique().alias("weeks"), pl.col("SHOP_DATE").min().alias("lo"),
        pl.col("SHOP_DATE").max().alias("hi"),
    ).sort("file_index")
    for i, (weeks, lo, hi) in enumerate(per_file.select("weeks", "lo", "hi").iter_rows()):
        code = week_code(i)
        assert weeks == [code]
        monday = week_monday(code)
        assert int(monday.strftime("%Y%m%d")) <= lo <= hi <= int((monday + dt.timedelta(days=6)).strftime("%Y%m%d"))
    # every weekday of the week is used, so the day assignment is not degenerate
    assert typed["SHOP_WEEKDAY"].n_unique() == 7


def test_week_rollover_200652_to_200701(tmp_path):
    cfg = GeneratorConfig(n_weeks=48, n_products=40, n_stores=2, n_customers=30, baskets_per_week=8)
    summary = generate(cfg, tmp_path)
    names = [f.name for f in summary.files]
    assert names[45:48] == ["transactions_200652.csv", "transactions_200701.csv", "transactions_200702.csv"]
    df = pl.read_csv(summary.files[46], infer_schema=False)
    assert set(df["SHOP_WEEK"]) == {"200701"}
    monday = week_monday(200701)
    assert monday == dt.date(2007, 2, 26)
    days = {int((monday + dt.timedelta(days=d)).strftime("%Y%m%d")) for d in range(7)}
    assert set(df["SHOP_DATE"].cast(pl.Int64)) <= days


def test_weekday_rule_and_hours(typed):
    # Python's datetime decides the LGSR weekday of every distinct date; every row is joined to it
    dates = typed["SHOP_DATE"].unique().to_list()
    expected = pl.DataFrame(
        {
            "SHOP_DATE": dates,
            "expected": [lgsr_weekday(dt.datetime.strptime(str(d), "%Y%m%d").date()) for d in dates],
        }
    )
    joined = typed.join(expected, on="SHOP_DATE", how="left")
    assert joined["expected"].null_count() == 0
    assert (joined["SHOP_WEEKDAY"] == joined["expected"]).all()
    assert typed["SHOP_HOUR"].is_between(0, 23).all()
    # stores open ~7-22, busiest 8-21
    assert typed["SHOP_HOUR"].is_between(7, 22).all()
    assert typed["SHOP_HOUR"].is_between(8, 21).mean() > 0.97


def test_id_formats(rows):
    for column, pattern in ID_PATTERNS.items():
        values = rows[column]
        if column == "CUST_CODE":
            values = values.drop_nulls()
        assert values.null_count() == 0, column
        assert values.str.contains(pattern).all(), (column, values.filter(~values.str.contains(pattern)).head())
    assert rows["PROD_CODE"].str.contains(r"^PRD09\d{5}$").all()


def test_code_sets_and_nulls(rows):
    for column, codes in CODE_SETS.items():
        values = rows[column].drop_nulls()
        assert values.is_in(list(codes)).all(), (column, values.unique().to_list())
    for column in set(LGSR_COLUMNS) - {"CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE"}:
        assert rows[column].null_count() == 0, column
    assert set(rows["STORE_FORMAT"]) == {"LS", "MS", "SS", "XLS"}
    assert rows["BASKET_SIZE"].is_in(["S", "M", "L"]).all()


def test_hierarchy_is_a_tree(rows):
    levels = ["PROD_CODE", "PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30", "PROD_CODE_40"]
    pairs = rows.select(levels).unique()
    for child, parent in zip(levels, levels[1:]):
        assert pairs.group_by(child).agg(pl.col(parent).n_unique())[parent].max() == 1, (child, parent)
    world_sizes = gen.hierarchy_sizes(generator_preset("tiny").n_products)
    assert world_sizes[0] >= 3 and world_sizes[1] >= 10


def test_anonymous_share_and_null_fields(baskets):
    anon = baskets["CUST_CODE"].is_null()
    assert 0.20 <= anon.mean() <= 0.30
    for c in ("CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE"):
        assert (baskets[c].is_null() == anon).all(), c


def test_xx_values_present(rows, baskets):
    for c in ("CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE", *XX_LABELS):
        assert (rows[c] == "XX").any(), c
    assert not (rows["BASKET_SIZE"] == "XX").any()
    # the three XX-able labels are unknown together
    xx = baskets["BASKET_TYPE"] == "XX"
    for c in XX_LABELS:
        assert ((baskets[c] == "XX") == xx).all(), c
    assert 0.005 < xx.mean() < 0.06


def test_basket_columns_constant_within_basket(typed):
    n = typed.group_by("BASKET_ID").agg(pl.col(BASKET_COLUMNS).n_unique())
    for c in BASKET_COLUMNS:
        assert n[c].max() == 1, c


def test_basket_ids_unique_and_contiguous(typed):
    ids = typed["BASKET_ID"]
    assert ids.cast(pl.String).str.len_chars().eq(15).all()
    runs = (ids != ids.shift(1)).fill_null(True).sum()
    assert runs == ids.n_unique()  # each basket is one run of consecutive rows
    assert typed.group_by("BASKET_ID").agg(pl.col("file_index").n_unique())["file_index"].max() == 1


def test_spend_is_quantity_times_unit_price(rows, typed, tiny):
    root, _ = tiny
    assert rows["SPEND"].str.contains(r"^\d+\.\d{2}$").all()  # written with 2 decimals
    assert (typed["QUANTITY"] >= 1).all() and (typed["QUANTITY"] <= 6).all()
    assert typed["QUANTITY"].eq(1).mean() > 0.6 and typed["QUANTITY"].gt(1).any()
    assert (typed["SPEND"] > 0).all()
    gt = root / "ground_truth"
    products = pl.read_parquet(gt / "products.parquet").select("PROD_CODE", "base_price")
    promos = pl.read_parquet(gt / "promotions.parquet").with_columns(pl.col("SHOP_WEEK").cast(pl.Int64))
    factor = {f: float(gen.FORMAT_PRICE_FACTOR[i]) for i, f in enumerate(("LS", "MS", "SS", "XLS"))}
    df = (
        typed.join(products, on="PROD_CODE", how="left")
        .join(promos, on=["SHOP_WEEK", "PROD_CODE"], how="left")
        .with_columns(
            unit=(
                pl.col("base_price") * pl.col("STORE_FORMAT").replace_strict(factor, return_dtype=pl.Float64)
                * (1 - pl.col("discount").fill_null(0.0))
            ).round(2).clip(0.01)
        )
    )
    assert df["base_price"].null_count() == 0
    assert ((df["QUANTITY"] * df["unit"]).round(2) - df["SPEND"]).abs().max() < 1e-6
    # promotions really lower prices in the file
    assert df["discount"].is_not_null().any()


def test_labels_follow_documented_rule(typed, baskets, tiny):
    root, _ = tiny
    size = pl.when(pl.col("lines") <= 4).then(pl.lit("S")).when(pl.col("lines") >= 15).then(pl.lit("L")).otherwise(
        pl.lit("M")
    )
    assert (baskets.select(size)["literal"] == baskets["BASKET_SIZE"]).all()
    known = baskets.filter(pl.col("BASKET_TYPE") != "XX")
    btype = (
        pl.when((pl.col("lines") >= 15) | (pl.col("spend") >= 50)).then(pl.lit("Full Shop"))
        .when((pl.col("lines") <= 5) & (pl.col("spend") < 15)).then(pl.lit("Top Up"))
        .otherwise(pl.lit("Small Shop"))
    )
    assert (known.select(btype)["literal"] == known["BASKET_TYPE"]).mean() > 0.995  # float sums at a threshold
    assert set(known["BASKET_TYPE"]) == {"Top Up", "Small Shop", "Full Shop"}

    products = pl.read_parquet(root / "ground_truth" / "products.parquet").select("PROD_CODE", "kind", "tier")
    tier_value = {"budget": 0.0, "mid": 1.0, "premium": 2.0}
    per_basket = (
        typed.join(products, on="PROD_CODE")
        .with_columns(pl.col("tier").replace_strict(tier_value, return_dtype=pl.Float64).alias("t"))
        .group_by("BASKET_ID")
        .agg(
            *(((pl.col("kind") == k) * pl.col("SPEND")).sum().alias(k) for k in ("Fresh", "Grocery", "Nonfood")),
            (pl.col("t") * pl.col("SPEND")).sum().alias("tier_spend"),
            pl.col("SPEND").sum().alias("total"),
            pl.col("BASKET_DOMINANT_MISSION").first(),
            pl.col("BASKET_PRICE_SENSITIVITY").first(),
        )
        .filter(pl.col("BASKET_DOMINANT_MISSION") != "XX")
    )
    shares = per_basket.select(pl.col("Fresh", "Grocery", "Nonfood") / pl.col("total"))
    top = shares.select(pl.concat_list(pl.all()).list.arg_max())["Fresh"].to_numpy()
    top_share = shares.select(pl.max_horizontal(pl.all()))["Fresh"].to_numpy()
    expected = np.where(top_share > 0.55, np.array(["Fresh", "Grocery", "Nonfood"])[top], "Mixed")
    assert (expected == per_basket["BASKET_DOMINANT_MISSION"].to_numpy()).mean() > 0.995
    mean_tier = (per_basket["tier_spend"] / per_basket["total"]).to_numpy()
    expected = np.where(mean_tier < 0.8, "LA", np.where(mean_tier > 1.2, "UM", "MM"))
    assert (expected == per_basket["BASKET_PRICE_SENSITIVITY"].to_numpy()).mean() > 0.995
    for c, codes in (("BASKET_DOMINANT_MISSION", 4), ("BASKET_PRICE_SENSITIVITY", 3)):
        assert per_basket[c].n_unique() == codes, c


def test_baskets_longer_than_50_lines_exist(tmp_path):
    cfg = GeneratorConfig(n_weeks=2, n_products=1000, n_stores=4, n_customers=1500, baskets_per_week=2000)
    summary = generate(cfg, tmp_path)
    lines = pl.read_csv(summary.files[0], columns=["BASKET_ID"])["BASKET_ID"].value_counts()["count"]
    assert lines.max() > 50


# ---- determinism and reuse ---------------------------------------------------------------------


def _digest(files: list[Path]) -> list[str]:
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    _, summary = tiny
    again = generate(generator_preset("tiny"), tmp_path / "same")
    assert not again.reused
    assert _digest(again.files) == _digest(summary.files)
    other = generate(generator_preset("tiny", seed=1), tmp_path / "other")
    assert all(a != b for a, b in zip(_digest(other.files), _digest(summary.files)))


def test_second_call_reuses_without_rewriting(tiny):
    root, summary = tiny
    manifest = json.loads((root / "ground_truth" / "generator.json").read_text())
    assert manifest["config"] == generator_preset("tiny").model_dump(mode="json")
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == info["sha256"], rel
    mtimes = {f: f.stat().st_mtime_ns for f in (root / "raw").iterdir()}
    again = generate(generator_preset("tiny"), root)
    assert again.reused
    assert (again.rows, again.baskets, again.customers, again.files) == (
        summary.rows, summary.baskets, summary.customers, summary.files,
    )
    assert {f: f.stat().st_mtime_ns for f in (root / "raw").iterdir()} == mtimes


def test_changed_file_or_config_regenerates(tmp_path):
    cfg = GeneratorConfig(n_weeks=3, n_products=40, n_stores=2, n_customers=50, baskets_per_week=20)
    first = generate(cfg, tmp_path)
    original = first.files[1].read_bytes()
    first.files[1].write_bytes(original[:-10])
    repaired = generate(cfg, tmp_path)
    assert not repaired.reused and repaired.files[1].read_bytes() == original
    fewer = generate(cfg.model_copy(update={"n_weeks": 2}), tmp_path)
    assert not fewer.reused
    # files of the earlier, longer generation are removed so ingest does not pick them up
    assert sorted((tmp_path / "raw").iterdir()) == fewer.files


def test_gzip_weeks_hold_the_same_rows_and_switching_replaces_the_other_kind(tiny, tmp_path):
    """``compress=True`` writes ``.csv.gz`` weeks whose text is the plain generation's, byte for byte; it is
    reused as such, and switching kind regenerates and removes the other kind's files (else a week
    would be in the raw folder twice)."""
    import gzip

    _, plain = tiny
    packed = generate(generator_preset("tiny"), tmp_path, compress=True)
    assert [f.name for f in packed.files] == [f.name + ".gz" for f in plain.files]
    assert [gzip.decompress(f.read_bytes()) for f in packed.files] == [f.read_bytes() for f in plain.files]
    assert sum(f.stat().st_size for f in packed.files) < 0.4 * sum(f.stat().st_size for f in plain.files)
    assert generate(generator_preset("tiny"), tmp_path, compress=True).reused
    unpacked = generate(generator_preset("tiny"), tmp_path)
    assert not unpacked.reused and sorted((tmp_path / "raw").iterdir()) == unpacked.files
    assert _digest(unpacked.files) == _digest(plain.files)


# ---- planted structure -------------------------------------------------------------------------


def test_world_round_trips_through_ground_truth(tiny):
    root, _ = tiny
    built = gen.build_world(generator_preset("tiny"))
    loaded = load_world(root / "ground_truth")
    for f in dataclasses.fields(gen.World):
        np.testing.assert_array_equal(getattr(loaded, f.name), getattr(built, f.name), err_msg=f.name)
    customers = pl.read_parquet(root / "ground_truth" / "customers.parquet")
    assert customers.height == generator_preset("tiny").n_customers
    assert customers["staples"].list.len().min() >= 5


def test_cold_start_customers_in_last_weeks(baskets):
    weeks = sorted(baskets["SHOP_WEEK"].unique().to_list())
    n_hist, n_test = int(0.8 * len(weeks)), max(1, round(0.1 * len(weeks)))
    seen = baskets.filter(pl.col("SHOP_WEEK").is_in(weeks[:n_hist]))["CUST_CODE"].drop_nulls().unique()
    test = baskets.filter(pl.col("SHOP_WEEK").is_in(weeks[-n_test:]), pl.col("CUST_CODE").is_not_null())
    cold = ~test["CUST_CODE"].is_in(seen.implode())
    assert test.height > 50
    assert 0.05 <= cold.mean() <= 0.4


def test_customers_rebuy_their_staples(typed, tiny):
    root, _ = tiny
    customers = pl.read_parquet(root / "ground_truth" / "customers.parquet").select("CUST_CODE", "staples")
    staple_pairs = customers.explode("staples").rename({"staples": "PROD_CODE"}).with_columns(staple=pl.lit(True))
    carded = typed.filter(pl.col("CUST_CODE").is_not_null()).join(
        staple_pairs, on=["CUST_CODE", "PROD_CODE"], how="left"
    )
    assert carded["staple"].is_not_null().mean() > 0.35


def test_oracle_recall_at_least_twice_popularity(tiny):
    root, _ = tiny
    result = measure_recall(root, k=10, seed=0)
    assert result["baskets"] >= 50
    assert 0.0 < result["popularity_recall"] < 0.5
    assert result["oracle_recall"] >= 2 * result["popularity_recall"]


def test_no_temporary_files_and_manifest_last(tiny):
    root, _ = tiny
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    gt = root / "ground_truth"
    manifest = gt / "generator.json"
    newest = max(p.stat().st_mtime_ns for p in list(gt.iterdir()) + list((root / "raw").iterdir()))
    assert manifest.stat().st_mtime_ns == newest
    assert re.fullmatch(r"baskets_\d{6}\.parquet", sorted(p.name for p in gt.iterdir())[0])
