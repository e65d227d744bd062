"""Asset checks on the prep assets. Each reads what its asset's latest materialization points at."""

from pathlib import Path

import dagster as dg

from retailsim_pipeline.defs.prep_assets import basket_samples, tensor_cache
from retailsim_pipeline.defs.resources import RetailSimData
from retailsim_pipeline.prep.cache import TensorCache
from retailsim_pipeline.prep.cache_checks import check_leakage, check_manifest
from retailsim_pipeline.prep.samples import SPLITS, scan_samples


def _latest_cache(context: dg.AssetCheckExecutionContext) -> TensorCache:
    event = context.instance.get_latest_materialization_event(tensor_cache.key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure("tensor_cache has never been materialized")
    return TensorCache.open(Path(event.asset_materialization.metadata["cache_path"].value))


@dg.asset_check(asset=basket_samples, blocking=True, description="Splits hold disjoint baskets and follow each other in time: "
                "every train week < every validation week < every test week.")
def splits_disjoint_and_ordered(retailsim_data: RetailSimData) -> dg.AssetCheckResult:
    samples = retailsim_data.paths().samples
    ranges, ids = {}, {}
    for s in SPLITS:
        frame = scan_samples(samples, s).select("basket_id", "week").collect()
        ranges[s] = (frame.get_column("week").min(), frame.get_column("week").max())
        ids[s] = frame.get_column("basket_id")
    ordered = ranges["train"][1] < ranges["validation"][0] and ranges["validation"][1] < ranges["test"][0]
    overlaps = {
        f"{a}∩{b}": int(ids[a].is_in(ids[b].implode()).sum())
        for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]
    }
    duplicates = {s: int(ids[s].is_duplicated().sum()) for s in SPLITS}
    passed = ordered and not any(overlaps.values()) and not any(duplicates.values())
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            **{f"{s}_weeks": f"{lo} – {hi}" for s, (lo, hi) in ranges.items()},
            **{f"overlap {k}": v for k, v in overlaps.items()},
            **{f"duplicates {k}": v for k, v in duplicates.items()},
        },
    )


@dg.asset_check(asset=tensor_cache, blocking=True, description="Leakage guard: every fitted table (vocabulary, embeddings, "
                "prices, product neighbours, customer profile and store tables), refit from the train split alone, equals the cached "
                "one; the point-in-time history arrays equal their recomputation from the samples; and changing "
                "a basket and every later one of its customer leaves that basket's and the earlier baskets' "
                "features unchanged.")
def no_leakage(context: dg.AssetCheckExecutionContext, retailsim_data: RetailSimData) -> dg.AssetCheckResult:
    outcome = check_leakage(_latest_cache(context), retailsim_data.paths().samples)
    return dg.AssetCheckResult(
        passed=outcome.passed,
        metadata={k: v for k, v in outcome.details.items()},
        description=None if outcome.passed else outcome.summary(),
    )


@dg.asset_check(asset=tensor_cache, blocking=True, description="manifest.json agrees with the arrays: shapes, dtypes, "
                "sha256, offsets, index bounds.")
def manifest_consistent(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    outcome = check_manifest(_latest_cache(context))
    return dg.AssetCheckResult(
        passed=outcome.passed,
        metadata={**outcome.details, "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in outcome.failures)
                                                                     or "none")},
        description=None if outcome.passed else outcome.summary(),
    )


prep_checks = [splits_disjoint_and_ordered, no_leakage, manifest_consistent]
