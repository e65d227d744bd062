"""Real materializations of the data assets on the tiny preset, on a real (temporary) instance."""

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from retailsim_pipeline.defs.checks import prep_checks
from retailsim_pipeline.defs.ingest_assets import raw_transactions, weekly_files
from retailsim_pipeline.defs.prep_assets import basket_samples, tensor_cache
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.runner import dagster_stale, materialize_selection
from retailsim_pipeline.definitions import defs
from retailsim_pipeline.defs.settings import SplitSettings
from retailsim_pipeline.prep.cache import TensorCache

ASSETS = [raw_transactions, basket_samples, tensor_cache, *prep_checks]


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def _weeks(paths) -> list[str]:
    return sorted(p.stem.split("_")[1] for p in paths.raw.glob("transactions_*.csv"))


def test_materialize_the_three_assets_end_to_end(tiny_copy, instance):
    resources = {"retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))}
    weeks = _weeks(tiny_copy)
    instance.add_dynamic_partitions(weekly_files.name, weeks)
    for week in weeks:
        result = dg.materialize([raw_transactions], partition_key=week, instance=instance, resources=resources)
        assert result.success
        (check,) = result.get_asset_check_evaluations()
        assert check.passed and check.check_name == "quarantine_rate_below_threshold"
        meta = result.asset_materializations_for_node("raw_transactions")[0].metadata
        assert meta["rows"].value > 0 and meta["quarantined"].value == 0
        assert meta["baskets"].value > 0 and meta["customers"].value > 0
    result = dg.materialize(
        ASSETS, selection=[basket_samples, tensor_cache], instance=instance, resources=resources,
        run_config=dg.RunConfig({"basket_samples": SplitSettings(validation_fraction=0.1, test_fraction=0.1)}),
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"splits_disjoint_and_ordered": True, "no_leakage": True, "manifest_consistent": True}
    samples_meta = result.asset_materializations_for_node("basket_samples")[0].metadata
    assert samples_meta["train_baskets"].value > samples_meta["test_baskets"].value > 0
    assert "| split |" in samples_meta["splits"].value and "lines" in samples_meta["basket_length_histogram"].value
    cache_meta = result.asset_materializations_for_node("tensor_cache")[0].metadata
    cache = TensorCache.open(cache_meta["cache_path"].value)
    assert cache.manifest["upstream"]["basket_samples"] == samples_meta["samples_version"].value
    # Lineage: data versions recorded by Dagster are the content hashes of each stage.
    materialization = result.asset_materializations_for_node("tensor_cache")[0]
    assert materialization.tags["dagster/data_version"] == cache.manifest["key"]


def _dirty(paths, week: str) -> None:
    """Every third line of ``week`` gets a negative QUANTITY (and some a bad weekday): ~1/3 quarantined."""
    source = paths.raw / f"transactions_{week}.csv"
    lines = source.read_text().splitlines()
    broken = [line.replace(",1,", ",-1,", 1) if i % 3 == 1 else line for i, line in enumerate(lines)]
    source.write_text("\n".join(broken) + "\n")


def test_quarantine_check_fails_on_a_dirty_week(tiny_copy, instance):
    week = _weeks(tiny_copy)[0]
    _dirty(tiny_copy, week)
    instance.add_dynamic_partitions(weekly_files.name, [week])
    result = dg.materialize([raw_transactions], partition_key=week, instance=instance, raise_on_error=False,
                            resources={"retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))})
    assert not result.success  # the check is blocking: the step fails after writing
    assert result.asset_materializations_for_node("raw_transactions")  # the week is written, for inspection
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["quarantine_rate"].value > 0.01
    assert f"transactions_{week}.csv" in check.description and "QUANTITY must be > 0: " in check.description
    q = pl.read_parquet(tiny_copy.quarantine / f"transactions_{week}.parquet")
    assert q.height > 0 and set(q.get_column("source_file")) == {f"transactions_{week}.csv"}


@pytest.mark.parametrize("select", ["*", "key:raw_transactions", "key:basket_samples"])
def test_a_failed_week_stops_every_run_before_downstream(tiny_copy, instance, select):
    weeks = _weeks(tiny_copy)
    _dirty(tiny_copy, weeks[3])
    header_only = tiny_copy.raw / f"transactions_{weeks[5]}.csv"
    header_only.write_text(header_only.read_text().splitlines()[0] + "\n")
    first = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    # Then again with the selection under test: the failed weeks are current, and still block.
    report = materialize_selection(select, tiny_copy, instance=instance, defs=defs, progress=False)
    for r in (first, report):
        assert not r.success and not r.assets_materialized
        assert len(r.failed_weeks) == 2, r.failed_weeks
        dirty, empty = r.failed_weeks
        assert dirty.startswith(f"week {weeks[3]} (") and f"transactions_{weeks[3]}.csv" in dirty
        assert "% > 1.00%" in dirty and "QUANTITY must be > 0: " in dirty  # share and top reasons with counts
        assert f"transactions_{weeks[5]}.csv" in empty and "no data line" in empty
        text = "\n".join(r.lines())
        assert "STOPPED: 2 week(s) failed the blocking quarantine check" in text
    assert not tiny_copy.samples.exists()  # nothing downstream ran
    assert instance.get_latest_materialization_event(basket_samples.key) is None

    # The UI path: basket_samples launched on its own refuses, naming the weeks.
    result = dg.materialize([basket_samples], instance=instance, raise_on_error=False,
                            resources={"retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))})
    assert not result.success
    message = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()
    assert f"week {weeks[3]}" in message and f"week {weeks[5]}" in message

    # Fixed files (a header-only week removed) let the next run through.
    generate_fixed = tiny_copy.raw / f"transactions_{weeks[3]}.csv"
    generate_fixed.write_text("\n".join(
        line.replace(",-1,", ",1,", 1) for line in generate_fixed.read_text().splitlines()) + "\n")
    header_only.unlink()
    instance.delete_dynamic_partition(weekly_files.name, weeks[5])
    fixed = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert fixed.success, fixed.lines()
    assert fixed.assets_materialized == ["basket_samples", "tensor_cache"]


def test_a_week_present_twice_stops_the_run_naming_both_files(tiny_copy, instance):
    import gzip

    week = _weeks(tiny_copy)[0]
    plain = tiny_copy.raw / f"transactions_{week}.csv"
    (tiny_copy.raw / f"transactions_{week}.csv.gz").write_bytes(gzip.compress(plain.read_bytes()))
    report = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert not report.success and not report.partitions_materialized
    (failure,) = report.failures
    assert f"transactions_{week}.csv and transactions_{week}.csv.gz" in failure


def test_compressed_weeks_are_ingested_like_plain_ones(tiny_copy, instance, tmp_path):
    import gzip
    import shutil

    plain_root = tmp_path / "plain"
    shutil.copytree(tiny_copy.root, plain_root)
    for source in tiny_copy.raw.glob("transactions_*.csv"):
        (source.parent / (source.name + ".gz")).write_bytes(gzip.compress(source.read_bytes()))
        source.unlink()
    report = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert report.success, report.lines()
    assert sorted(report.partitions_materialized) == sorted(
        p.name[len("transactions_"):-len(".csv.gz")] for p in tiny_copy.raw.glob("*.csv.gz"))
    from retailsim_pipeline.config import DataPaths
    from retailsim_pipeline.prep.samples import SPLITS, build_basket_samples, read_samples

    plain = DataPaths(plain_root)
    from retailsim_pipeline.prep.ingest import ingest_weekly_file

    for source in sorted(plain.raw.glob("*.csv")):
        ingest_weekly_file(source, plain.transactions, plain.quarantine)
    build_basket_samples(plain.transactions, plain.samples)
    for split in SPLITS:
        assert read_samples(tiny_copy.samples, split).equals(read_samples(plain.samples, split))


def test_a_file_in_another_format_fails_the_run_with_its_name(tiny_copy, instance):
    bad = tiny_copy.raw / "transactions_200619.csv"
    bad.write_text("store,amount\nA,1\n")
    instance.add_dynamic_partitions(weekly_files.name, ["200619"])
    result = dg.materialize([raw_transactions], partition_key="200619", instance=instance, raise_on_error=False,
                            resources={"retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))})
    assert not result.success
    message = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()
    assert "transactions_200619.csv" in message and "SHOP_WEEK" in message
    assert not (tiny_copy.transactions / "transactions_200619.parquet").exists()


DATA_STAGES = "group:ingest or group:prep"


def test_runner_materializes_missing_then_only_what_changed(tiny_copy, instance):
    report = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    weeks = _weeks(tiny_copy)
    assert report.success, report.failures
    assert report.registered == weeks and sorted(report.partitions_materialized) == weeks
    assert report.assets_materialized == ["basket_samples", "tensor_cache"]
    assert {"tensor_cache:no_leakage", "basket_samples:splits_disjoint_and_ordered"} <= set(report.checks_passed)

    # The declared jobs ran, the weekly partitions as one multi-partition run: the Runs page reads as what happened.
    assert [instance.get_run_by_id(r).job_name for r in report.run_ids] == ["ingest_job", "retrain_job"]
    ingest_run = instance.get_run_by_id(report.run_ids[0])
    assert (ingest_run.tags["dagster/asset_partition_range_start"],
            ingest_run.tags["dagster/asset_partition_range_end"]) == (weeks[0], weeks[-1])
    for week in (weeks[0], weeks[-1]):  # each week its own materialization, with its own metadata
        mat = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=raw_transactions.key, asset_partitions=[week]), limit=1).records[0].asset_materialization
        assert mat.metadata["source"].value.endswith(f"transactions_{week}.csv")
        assert mat.tags["dagster/data_version"] == mat.metadata["source_sha256"].value[:16]
    graph = defs.resolve_asset_graph()
    downstream = [basket_samples.key, tensor_cache.key]
    assert dagster_stale(instance, graph, downstream) == set()  # Dagster's badges: all fresh

    again = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert again.success and not again.partitions_materialized and not again.assets_materialized
    assert again.partitions_current == len(weeks) and not again.run_ids

    # A corrected file (new content) is re-ingested; Dagster itself then calls the samples stale (the UI's
    # badge), and the runner materializes them and what depends on them.
    source = tiny_copy.raw / f"transactions_{weeks[2]}.csv"
    lines = source.read_text().splitlines()
    source.write_text("\n".join(lines[:-5]) + "\n")
    week_only = materialize_selection("key:raw_transactions", tiny_copy, instance=instance, defs=defs,
                                      progress=False)
    assert week_only.partitions_materialized == [weeks[2]] and not week_only.assets_materialized
    assert instance.get_run_by_id(week_only.run_ids[0]).tags["dagster/partition"] == weeks[2]
    assert dagster_stale(instance, graph, downstream) == {basket_samples.key}  # its parent changed
    third = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert not third.partitions_materialized
    assert third.assets_materialized == ["basket_samples", "tensor_cache"]
    assert dagster_stale(instance, graph, downstream) == set()

    # Selecting one asset leaves the rest alone.
    fourth = materialize_selection("key:tensor_cache", tiny_copy, instance=instance, defs=defs, progress=False)
    assert fourth.success and fourth.assets_current == ["tensor_cache"] and not fourth.partitions_materialized


def test_assets_hand_each_other_json_never_pickles(tiny_copy, instance):
    import json

    report = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert report.success, report.lines()
    stored = tiny_copy.dagster / "values" / "tensor_cache" / "__all__.json"
    assert json.loads(stored.read_text()) == str(TensorCache.latest(tiny_copy.cache).path)
    pickles = [p for p in Path(instance.storage_directory()).rglob("*") if p.is_file() and "compute_logs" not in p.parts]
    assert pickles == [], pickles  # Dagster's default IO manager (pickles) was never used

    from retailsim_pipeline.defs.resources import JsonIOManager

    manager = JsonIOManager(tmp := tiny_copy.root / "values")
    with pytest.raises(TypeError, match="not JSON"):
        manager.handle_output(dg.build_output_context(name="result", asset_key="x"), object())
    assert not tmp.exists() or not list(tmp.rglob("*.json"))
