import polars as pl
import pytest
from polars.testing import assert_frame_equal

from retailsim_pipeline.config import SplitConfig
from retailsim_pipeline.prep.ingest import ingest_weekly_file
from retailsim_pipeline.prep.samples import (
    SPLITS,
    EmptySplitError,
    baskets_from_lines,
    build_basket_samples,
    read_manifest,
    read_samples,
    split_weeks,
)
from retailsim_pipeline.prep.schema import LABEL_COLUMNS, week_code


def _all_samples(paths) -> pl.DataFrame:
    return pl.concat([read_samples(paths.samples, s).with_columns(pl.lit(s).alias("split")) for s in SPLITS])


def test_split_weeks_default_fractions():
    weeks = [week_code(i) for i in range(60)]  # 200607 … 200714, across the fiscal year rollover
    s = split_weeks(weeks, SplitConfig())
    assert s.train == (weeks[0], weeks[47])
    assert s.validation == (weeks[48], weeks[53])
    assert s.test == (weeks[54], weeks[59])
    assert s.of(200652) == "train" and s.of(200701) == "train" and s.of(weeks[59]) == "test"


def test_split_weeks_explicit_and_invalid():
    weeks = [week_code(i) for i in range(12)]
    s = split_weeks(weeks, SplitConfig(validation_start_week=weeks[6], test_start_week=weeks[9]))
    assert s.train == (weeks[0], weeks[5]) and s.validation == (weeks[6], weeks[8]) and s.test == (weeks[9], weeks[11])
    with pytest.raises(ValueError, match="empty"):
        split_weeks(weeks[:2], SplitConfig())
    with pytest.raises(ValueError, match="before"):
        SplitConfig(validation_start_week=200610, test_start_week=200609)
    with pytest.raises(ValueError, match="both"):
        SplitConfig(validation_start_week=200610)


def test_splits_are_disjoint_ordered_and_complete(tiny_prepped):
    samples = _all_samples(tiny_prepped)
    assert samples.get_column("basket_id").is_unique().all()
    ranges = samples.group_by("split").agg(pl.col("week").min().alias("lo"), pl.col("week").max().alias("hi"))
    r = {row["split"]: (row["lo"], row["hi"]) for row in ranges.iter_rows(named=True)}
    assert r["train"][1] < r["validation"][0] <= r["validation"][1] < r["test"][0]
    # Every accepted transaction line is in exactly one basket sample.
    lines = pl.scan_parquet(sorted(tiny_prepped.transactions.glob("*.parquet")))
    assert samples.get_column("n_lines").sum() == lines.select(pl.len()).collect().item()
    assert samples.height == lines.select(pl.col("BASKET_ID").n_unique()).collect().item()
    manifest = read_manifest(tiny_prepped.samples)
    assert manifest["counts"] == {s: samples.filter(pl.col("split") == s).height for s in SPLITS}


def test_samples_keep_line_order_prices_and_labels(tiny_prepped):
    """Each sample equals its basket's lines read straight from the CSV, in line order."""
    raw = pl.read_csv(sorted(tiny_prepped.raw.glob("*.csv"))[0], infer_schema=False)
    expected = (
        raw.group_by("BASKET_ID", maintain_order=True)
        .agg(pl.col("PROD_CODE").head(50), pl.col("SPEND").cast(pl.Float64).head(50),
             pl.col("QUANTITY").cast(pl.Int32).head(50),
             *[pl.col(c).first() for c in LABEL_COLUMNS], pl.col("CUST_CODE").first(), pl.len().alias("n"))
        .with_columns(pl.col("BASKET_ID").cast(pl.Int64))
    )
    got = (
        _all_samples(tiny_prepped)
        .filter(pl.col("basket_id").is_in(expected.get_column("BASKET_ID").implode()))
        .select(
            pl.col("basket_id").alias("BASKET_ID"),
            pl.col("products").cast(pl.List(pl.String)).alias("PROD_CODE"),
            pl.col("spend").alias("SPEND"), pl.col("quantity").alias("QUANTITY"),
            *[pl.col(c.lower()).cast(pl.String).alias(c) for c in LABEL_COLUMNS],
            pl.col("cust_code").cast(pl.String).alias("CUST_CODE"),
            pl.col("n_lines").cast(pl.UInt32).alias("n"),
        )
    )
    assert_frame_equal(got, expected, check_row_order=True)


def test_long_baskets_truncated_to_max_len_with_full_count():
    n = 73
    lines = pl.DataFrame({
        "BASKET_ID": [1] * n + [2] * 3,
        "SHOP_WEEK": [200607] * (n + 3), "SHOP_DATE": [20060410] * (n + 3), "SHOP_WEEKDAY": [2] * (n + 3),
        "SHOP_HOUR": [10] * (n + 3), "STORE_CODE": ["STORE00001"] * (n + 3), "STORE_FORMAT": ["LS"] * (n + 3),
        "STORE_REGION": ["E01"] * (n + 3), "CUST_CODE": [None] * (n + 3), "CUST_PRICE_SENSITIVITY": [None] * (n + 3),
        "CUST_LIFESTAGE": [None] * (n + 3),
        "PROD_CODE": [f"PRD{900000 + i:07d}" for i in range(n)] + ["PRD0900001", "PRD0900002", "PRD0900003"],
        "SPEND": [float(i) for i in range(n + 3)], "QUANTITY": [1] * (n + 3),
        **{c: ["L"] * (n + 3) if c == "BASKET_SIZE" else ["XX"] * (n + 3) for c in LABEL_COLUMNS},
    }).with_columns(pl.col("SHOP_DATE").cast(pl.Int32))
    out = baskets_from_lines(lines.lazy(), max_basket_len=50).collect()
    assert out.get_column("n_lines").to_list() == [n, 3]
    assert out.get_column("products").list.len().to_list() == [50, 3]
    assert out.row(0, named=True)["products"][:2] == ["PRD0900000", "PRD0900001"]
    assert out.row(0, named=True)["spend"][-1] == 49.0


def test_build_is_atomic_and_repeatable(tiny_copy):
    paths = tiny_copy
    for source in sorted(paths.raw.glob("*.csv")):
        ingest_weekly_file(source, paths.transactions, paths.quarantine)
    first = build_basket_samples(paths.transactions, paths.samples)
    second = build_basket_samples(paths.transactions, paths.samples)
    assert first.sha256 == second.sha256 and first.data_version == second.data_version
    assert not list(paths.samples.glob(".*tmp*"))
    # A different split gives a different version.
    third = build_basket_samples(paths.transactions, paths.samples, SplitConfig(validation_fraction=0.2))
    assert third.data_version != first.data_version
    assert third.counts["validation"] > first.counts["validation"]


def test_no_transactions_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ingest raw files first"):
        build_basket_samples(tmp_path / "nothing", tmp_path / "samples")


def _ingest_all(paths) -> None:
    for source in sorted(paths.raw.glob("*.csv")):
        ingest_weekly_file(source, paths.transactions, paths.quarantine)


def test_no_valid_rows_is_a_clear_error_and_writes_nothing(tiny_copy):
    """Every row quarantined (here: every week header-only) -> a named error, no samples folder."""
    for source in tiny_copy.raw.glob("*.csv"):
        source.write_text(source.read_text().splitlines()[0] + "\n")
    _ingest_all(tiny_copy)
    with pytest.raises(EmptySplitError, match=r"no valid rows: 12 ingested week\(s\) \(200607…200618\)"):
        build_basket_samples(tiny_copy.transactions, tiny_copy.samples)
    assert not tiny_copy.samples.exists()


def test_a_split_left_empty_names_the_split_and_the_weeks(tiny_copy):
    _ingest_all(tiny_copy)
    good = build_basket_samples(tiny_copy.transactions, tiny_copy.samples)
    before = {p.name: p.read_bytes() for p in tiny_copy.samples.iterdir()}
    late = SplitConfig(validation_start_week=200701, test_start_week=200702)
    with pytest.raises(EmptySplitError) as info:
        build_basket_samples(tiny_copy.transactions, tiny_copy.samples, late)
    message = str(info.value)
    assert "split 'validation' would be empty" in message
    assert "12 week(s) with valid rows available (200607…200618)" in message
    assert "weeks 200701 to before 200702" in message
    # The earlier samples are untouched, and nothing half-written is left.
    assert {p.name: p.read_bytes() for p in tiny_copy.samples.iterdir()} == before
    assert good.counts["test"] > 0


def test_an_empty_week_does_not_shift_the_split(tiny_copy):
    _ingest_all(tiny_copy)
    reference = build_basket_samples(tiny_copy.transactions, tiny_copy.samples)
    # A 13th week with a header only (or every row quarantined) lands as an empty parquet.
    last = sorted(tiny_copy.raw.glob("*.csv"))[-1]
    extra = tiny_copy.raw / "transactions_200619.csv"
    extra.write_text(last.read_text().splitlines()[0] + "\n")
    ingest_weekly_file(extra, tiny_copy.transactions, tiny_copy.quarantine)
    again = build_basket_samples(tiny_copy.transactions, tiny_copy.samples)
    assert again.counts == reference.counts and again.splits == reference.splits
    assert again.empty_weeks == [200619]


def test_streaming_in_several_chunks_gives_the_same_samples(tiny_copy, tmp_path, monkeypatch):
    """Chunks of a few weeks (parts merged into one file per split) equal the one-chunk build."""
    import retailsim_pipeline.prep.samples as samples_mod

    _ingest_all(tiny_copy)
    whole = build_basket_samples(tiny_copy.transactions, tmp_path / "whole")
    monkeypatch.setattr(samples_mod, "_ROWS_PER_CHUNK", 3_000)  # ~2 weeks of tiny data per chunk
    assert len(samples_mod._chunks(sorted(samples_mod.weekly_transaction_files(tiny_copy.transactions).items()))) > 4
    chunked = build_basket_samples(tiny_copy.transactions, tmp_path / "chunked")
    assert chunked.counts == whole.counts and chunked.length_histogram == whole.length_histogram
    for split in SPLITS:
        assert_frame_equal(read_samples(tmp_path / "chunked", split), read_samples(tmp_path / "whole", split))
    assert not list((tmp_path / "chunked").glob(".*tmp*"))
