"""Real materializations of the data assets on the tiny preset, on a real (temporary) instance."""

import dagster as dg
import polars as pl
import pytest

from retailsim_pipeline.defs.checks import prep_checks
from retailsim_pipeline.defs.ingest_assets import raw_transactions, weekly_files
from retailsim_pipeline.defs.prep_assets import basket_samples, tensor_cache
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.runner import materialize_selection
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


def test_quarantine_check_fails_on_a_dirty_week(tiny_copy, instance):
    week = _weeks(tiny_copy)[0]
    source = tiny_copy.raw / f"transactions_{week}.csv"
    lines = source.read_text().splitlines()
    broken = [line.replace(",1,", ",-1,", 1) if i % 3 == 1 else line for i, line in enumerate(lines)]
    source.write_text("\n".join(broken) + "\n")
    instance.add_dynamic_partitions(weekly_files.name, [week])
    result = dg.materialize([raw_transactions], partition_key=week, instance=instance,
                            resources={"retailsim_data": RetailSimData(data_dir=str(tiny_copy.root))})
    assert result.success  # the asset is written; the check reports the problem
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["quarantine_rate"].value > 0.01
    q = pl.read_parquet(tiny_copy.quarantine / f"transactions_{week}.parquet")
    assert q.height > 0 and set(q.get_column("source_file")) == {source.name}


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

    again = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert again.success and not again.partitions_materialized and not again.assets_materialized
    assert again.partitions_current == len(weeks)

    # A corrected file (new content) is re-ingested, and everything downstream follows.
    source = tiny_copy.raw / f"transactions_{weeks[2]}.csv"
    lines = source.read_text().splitlines()
    source.write_text("\n".join(lines[:-5]) + "\n")
    third = materialize_selection(DATA_STAGES, tiny_copy, instance=instance, defs=defs, progress=False)
    assert third.partitions_materialized == [weeks[2]]
    assert third.assets_materialized == ["basket_samples", "tensor_cache"]

    # Selecting one asset leaves the rest alone.
    fourth = materialize_selection("key:tensor_cache", tiny_copy, instance=instance, defs=defs, progress=False)
    assert fourth.success and fourth.assets_current == ["tensor_cache"] and not fourth.partitions_materialized
