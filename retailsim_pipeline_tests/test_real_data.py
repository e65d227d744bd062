"""The published LGSR files, as they circulate, through ingest and the Dagster layer.

Reads ``../shared/lgsr_real/`` beside the checkout (or ``$RETAILSIM_LGSR_REAL``); every test skips
with the reason when that folder is absent (a user's clone). Nothing read here is written into the
project: outputs go to pytest's temporary folders.
"""

import gzip
import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from retailsim_pipeline.config import DataPaths
from retailsim_pipeline.prep.ingest import LossyCopyError, ingest_weekly_file, validate_transactions
from retailsim_pipeline.prep.ingest_batch import ingest_weekly_files
from retailsim_pipeline.prep.schema import SEGMENT_CODE_ALIASES

REAL = Path(os.environ.get("RETAILSIM_LGSR_REAL", Path(__file__).resolve().parents[2] / "shared" / "lgsr_real"))
WEEKLY = REAL / "weekly"
MANGLED = REAL / "spreadsheet_mangled" / "transactions_200607.csv.gz"
FIVE_WEEKS = [200607, 200644, 200652, 200701, 200752]

pytestmark = pytest.mark.skipif(
    not (WEEKLY / "transactions_200607.csv.gz").exists(),
    reason=f"the real LGSR sample is not here ({REAL}); it lives in shared/ beside the checkout",
)


def published_csv(week: int, folder: Path) -> Path:
    """The weekly file byte for byte as published (``transactions_YYYYWW.csv``), unpacked into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"transactions_{week}.csv"
    with gzip.open(WEEKLY / f"transactions_{week}.csv.gz", "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def as_text(path: Path) -> pl.DataFrame:
    """Every field as text, exactly as in the file (quoted empties stay "")."""
    return pl.read_csv(path, infer_schema=False)


@pytest.mark.parametrize("week", FIVE_WEEKS)
def test_published_week_lands_whole(week, tmp_path):
    source = published_csv(week, tmp_path / "raw")
    text = as_text(source)
    assert "seg_1" in text.columns and text.get_column("CUST_CODE").eq("").any(), "not the published layout"
    result = ingest_weekly_file(source, tmp_path / "transactions", tmp_path / "quarantine")
    assert result.lines == len(text)
    assert result.quarantine_rate < 0.01, result.reasons
    assert result.segment_codes == "coded"
    typed = pl.read_parquet(result.output)
    assert result.baskets == typed.get_column("BASKET_ID").n_unique() == text.get_column("BASKET_ID").n_unique()
    # Anonymous shoppers land with null card fields; carded ones keep their code.
    anonymous = text.get_column("CUST_CODE").eq("").sum()
    assert typed.get_column("CUST_CODE").null_count() == anonymous
    # A known customer without a lifestage ("") is a carded customer with a null lifestage.
    no_lifestage = text.filter((pl.col("CUST_CODE") != "") & (pl.col("seg_2") == "")).height
    assert typed.filter(pl.col("CUST_CODE").is_not_null() & pl.col("CUST_LIFESTAGE").is_null()).height == no_lifestage


def test_basket_lines_are_scattered_and_still_one_basket(tmp_path):
    source = published_csv(200607, tmp_path / "raw")
    text = as_text(source)
    runs = text.select((pl.col("BASKET_ID") != pl.col("BASKET_ID").shift()).sum()).item() + 1
    baskets = text.get_column("BASKET_ID").n_unique()
    assert (baskets, runs) == (3814, 19265)  # the README's measurement: lines are not adjacent
    from retailsim_pipeline.prep.samples import baskets_from_lines

    accepted, _ = validate_transactions(source)
    samples = baskets_from_lines(accepted.lazy()).collect()
    assert samples.height == baskets
    assert samples.get_column("n_lines").sum() == text.height


def test_segment_mapping_matches_documented_copy(tmp_path):
    """Row by row: the coded copy of 200607, mapped, equals the documented copy of the same week.

    The documented copy is the spreadsheet-mangled one (its BASKET_IDs are lost, its segment codes are
    not); it lacks the coded copy's first row.
    """
    accepted, quarantined = validate_transactions(published_csv(200607, tmp_path / "raw"))
    assert quarantined.is_empty()
    documented = pl.read_csv(MANGLED, infer_schema=False)
    assert len(documented) == len(accepted) - 1
    ours = accepted.slice(1).select(
        pl.col("PROD_CODE").cast(pl.String), pl.col("QUANTITY").cast(pl.String),
        pl.col("CUST_CODE").cast(pl.String), pl.col("CUST_PRICE_SENSITIVITY").cast(pl.String),
        pl.col("CUST_LIFESTAGE").cast(pl.String),
    )
    theirs = documented.select(
        "PROD_CODE", "QUANTITY",
        *[pl.when(pl.col(c) != "").then(pl.col(c)).alias(c)
          for c in ("CUST_CODE", "CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE")],
    )
    assert ours.equals(theirs)
    # Every code of the mapping occurs, so each one was checked above.
    for column, mapping in SEGMENT_CODE_ALIASES.items():
        assert set(mapping.values()) <= set(theirs.get_column(column).drop_nulls().unique())


def test_spreadsheet_mangled_copy_is_refused_as_a_whole(tmp_path):
    source = tmp_path / "raw" / "transactions_200607.csv"
    source.parent.mkdir()
    source.write_bytes(gzip.decompress(MANGLED.read_bytes()))
    with pytest.raises(LossyCopyError) as info:
        ingest_weekly_file(source, tmp_path / "transactions", tmp_path / "quarantine")
    message = str(info.value)
    for needle in ("transactions_200607.csv", "column BASKET_ID", "'9.94E+14'", "25,240 of 25,240 rows (100.0%)",
                   "re-export the file from the source without a spreadsheet: basket ids were rounded"):
        assert needle in message, (needle, message)
    assert not (tmp_path / "transactions").exists() and not (tmp_path / "quarantine").exists()


def test_compressed_week_equals_its_csv(tmp_path):
    plain = published_csv(200652, tmp_path / "plain")
    compressed = tmp_path / "gz" / "transactions_200652.csv.gz"
    compressed.parent.mkdir()
    shutil.copyfile(WEEKLY / "transactions_200652.csv.gz", compressed)
    a = ingest_weekly_file(plain, tmp_path / "a", tmp_path / "qa")
    b = ingest_weekly_file(compressed, tmp_path / "b", tmp_path / "qb")
    assert a.output.name == b.output.name == "transactions_200652.parquet"
    assert pl.read_parquet(a.output).equals(pl.read_parquet(b.output))
    assert (a.rows, a.quarantined, a.baskets) == (b.rows, b.quarantined, b.baskets)


def test_batched_ingest_equals_per_file_on_published_weeks(tmp_path):
    """``ingest_weekly_files`` over the five weeks (three compressed, two unpacked, in one batch) and the
    mangled copy gives, per file, what ``ingest_weekly_file`` gives: the same parquet, quarantine and
    counts, and for the mangled copy the same refusal, without holding up the others."""
    files = ([WEEKLY / f"transactions_{w}.csv.gz" for w in FIVE_WEEKS[:3]]
             + [published_csv(w, tmp_path / "raw") for w in FIVE_WEEKS[3:]] + [MANGLED])
    batch = list(ingest_weekly_files(files, tmp_path / "batch", tmp_path / "batch_q"))
    assert [o.source for o in batch] == files
    for source, outcome in zip(files[:-1], batch):
        alone = ingest_weekly_file(source, tmp_path / "alone", tmp_path / "alone_q")
        assert outcome.error is None and outcome.result.segment_codes == alone.segment_codes == "coded"
        got = outcome.result
        assert (got.rows, got.quarantined, got.baskets, got.customers, got.reasons) == (
            alone.rows, alone.quarantined, alone.baskets, alone.customers, alone.reasons)
        assert_frame_equal(pl.read_parquet(got.output), pl.read_parquet(alone.output))
        assert_frame_equal(pl.read_parquet(got.quarantine), pl.read_parquet(alone.quarantine))
    with pytest.raises(LossyCopyError) as info:
        ingest_weekly_file(MANGLED, tmp_path / "alone", tmp_path / "alone_q")
    assert isinstance(batch[-1].error, LossyCopyError) and str(batch[-1].error) == str(info.value)


def test_published_weeks_through_the_dagster_layer(tmp_path):
    """The five weeks dropped into raw/ compressed, as people keep them: registered, ingested, checked,
    and split into samples by ``retailsim run``'s runner on a real instance."""
    from retailsim_pipeline.defs.runner import materialize_selection
    from retailsim_pipeline.definitions import defs

    paths = DataPaths(tmp_path / "data")
    paths.raw.mkdir(parents=True)
    for week in FIVE_WEEKS:
        shutil.copyfile(WEEKLY / f"transactions_{week}.csv.gz", paths.raw / f"transactions_{week}.csv.gz")
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        report = materialize_selection("key:raw_transactions or key:basket_samples", paths, instance=instance,
                                       defs=defs, progress=False)
        assert report.success, report.lines()
        assert sorted(report.partitions_materialized) == [str(w) for w in FIVE_WEEKS]
        assert "basket_samples:splits_disjoint_and_ordered" in report.checks_passed
        assert report.assets_materialized == ["basket_samples"]
    counts = {s: pl.scan_parquet(paths.samples / f"{s}.parquet").select(pl.len()).collect().item()
              for s in ("train", "validation", "test")}
    total = sum(pl.read_csv(WEEKLY / f"transactions_{w}.csv.gz", columns=["BASKET_ID"]).get_column("BASKET_ID")
                .n_unique() for w in FIVE_WEEKS)
    assert sum(counts.values()) == total and min(counts.values()) > 0


def test_published_baskets_list_their_products_sorted_by_code(tmp_path):
    """Why training shuffles each basket's lines (``TrainingConfig.shuffle_lines``) and the evaluation
    never hides a line in place: in the published files most baskets' products come in product-code
    order, so a hidden line's neighbours would give its code range away. A random order would leave
    only about 1 in k! of k-line baskets sorted."""
    from retailsim_pipeline.prep.samples import baskets_from_lines

    accepted, _ = validate_transactions(published_csv(200607, tmp_path / "raw"))
    products = baskets_from_lines(accepted.lazy()).collect().get_column("products").cast(pl.List(pl.String))
    long = products.filter(products.list.len() >= 5)
    sorted_share = (long == long.list.sort()).mean()
    assert len(long) > 1000 and sorted_share > 0.9, sorted_share  # all of them in 200607; by chance < 1 %
