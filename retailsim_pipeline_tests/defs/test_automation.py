"""The new-data sensor and the weekly schedule, driven through their evaluation contexts on a real instance."""

import datetime as dt
import json

import dagster as dg
import pytest

from retailsim_pipeline.definitions import defs
from retailsim_pipeline.defs.automation import new_raw_files_sensor, weekly_retrain_schedule
from retailsim_pipeline.defs.ingest_assets import weekly_files
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.defs.runner import materialize_selection


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def _tick(instance, paths, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"retailsim_data": RetailSimData(data_dir=str(paths.root))})
    return new_raw_files_sensor(context)


def test_sensor_adds_partitions_and_requests_each_file_once(tiny_copy, instance):
    weeks = sorted(p.stem.split("_")[1] for p in tiny_copy.raw.glob("transactions_*.csv"))
    first = _tick(instance, tiny_copy)
    assert [r.partition_key for r in first.run_requests] == weeks
    assert first.dynamic_partitions_requests[0].partition_keys == weeks
    assert len({r.run_key for r in first.run_requests}) == len(weeks)
    instance.add_dynamic_partitions(weekly_files.name, weeks)  # what the daemon does with the request

    second = _tick(instance, tiny_copy, first.cursor)  # nothing changed: nothing requested
    assert not second.run_requests and not second.dynamic_partitions_requests
    assert "no new or changed" in second.skip_reason.skip_message

    # A corrected file is requested again under a new run key; a new week adds a partition.
    fixed = tiny_copy.raw / f"transactions_{weeks[3]}.csv"
    fixed.write_text("\n".join(fixed.read_text().splitlines()[:-3]) + "\n")
    new = tiny_copy.raw / "transactions_200619.csv"
    new.write_text(fixed.read_text().replace(weeks[3], "200619"))
    third = _tick(instance, tiny_copy, second.cursor)
    assert sorted(r.partition_key for r in third.run_requests) == sorted([weeks[3], "200619"])
    old_key = next(r.run_key for r in first.run_requests if r.partition_key == weeks[3])
    assert old_key not in {r.run_key for r in third.run_requests}
    assert third.dynamic_partitions_requests[0].partition_keys == ["200619"]
    new_request = next(r for r in third.run_requests if r.partition_key == "200619")
    assert json.loads(third.cursor)[new.name][2] == new_request.tags["retailsim/source_sha256"]


def test_schedule_skips_without_new_data_and_runs_after_it(tiny_copy, instance):
    when = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.timezone.utc)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
    skip = weekly_retrain_schedule(context)
    assert isinstance(skip, dg.SkipReason) and "no weekly file" in skip.skip_message

    report = materialize_selection("group:ingest", tiny_copy, instance=instance, defs=defs, progress=False)
    assert report.success
    run = weekly_retrain_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))
    assert isinstance(run, dg.RunRequest) and run.run_key == "retrain-2026-11-23"

    # Pretend a model was trained after that data: the next tick has nothing to do.
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="trained_world_model"))
    skip = weekly_retrain_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))
    assert isinstance(skip, dg.SkipReason) and "no new data" in skip.skip_message
    assert weekly_retrain_schedule.cron_schedule == "0 3 * * 1"


def test_sensor_treats_compressed_weeks_like_plain_ones_and_skips_a_week_present_twice(tiny_copy, instance):
    import gzip

    weeks = sorted(p.stem.split("_")[1] for p in tiny_copy.raw.glob("transactions_*.csv"))
    # Half the weeks compressed, as people keep them: the run key hashes the file as stored.
    for week in weeks[::2]:
        plain = tiny_copy.raw / f"transactions_{week}.csv"
        (tiny_copy.raw / f"transactions_{week}.csv.gz").write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
    first = _tick(instance, tiny_copy)
    assert sorted(r.partition_key for r in first.run_requests) == weeks
    cursor = json.loads(first.cursor)
    assert f"transactions_{weeks[0]}.csv.gz" in cursor and f"transactions_{weeks[1]}.csv" in cursor
    instance.add_dynamic_partitions(weekly_files.name, weeks)

    # The same week dropped in again uncompressed: skipped, with both files named in the log.
    twin = tiny_copy.raw / f"transactions_{weeks[0]}.csv"
    twin.write_bytes(gzip.decompress((tiny_copy.raw / f"transactions_{weeks[0]}.csv.gz").read_bytes()))
    second = _tick(instance, tiny_copy, first.cursor)
    assert not second.run_requests
    assert weeks[0] in second.skip_reason.skip_message and ".csv.gz" in second.skip_reason.skip_message
