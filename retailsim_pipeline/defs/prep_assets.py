"""Group ``prep``: basket samples split in time, and the tensor cache the model reads."""

import dagster as dg
import polars as pl

from retailsim_pipeline.defs.ingest_assets import failed_weeks, raw_transactions
from retailsim_pipeline.defs.metadata import column_schema, counts_table, markdown_table
from retailsim_pipeline.defs.resources import RetailSimData, writer_lock
from retailsim_pipeline.defs.settings import CacheSettings, SplitSettings
from retailsim_pipeline.prep.cache import CACHE_FORMAT
from retailsim_pipeline.prep.cache_build import build_tensor_cache
from retailsim_pipeline.prep.samples import SPLITS, build_basket_samples, read_samples

SAMPLES_CODE_VERSION = "1"
# The asset's own version (2: it outputs its folder as a value) and the cache layout's: bumping either
# marks the asset stale, so `retailsim run` and the UI rebuild it.
CACHE_CODE_VERSION = f"2.{CACHE_FORMAT}"

SAMPLE_COLUMN_DOCS = {
    "basket_id": "BASKET_ID",
    "n_lines": "lines in the basket before truncation to max_basket_len",
    "products": "PROD_CODE in line order (first max_basket_len lines)",
    "spend": "SPEND of those lines",
    "quantity": "QUANTITY of those lines",
    "cust_code": "null for anonymous shoppers",
}


@dg.asset(
    deps=[raw_transactions],
    group_name="prep",
    kinds={"polars", "parquet"},
    code_version=SAMPLES_CODE_VERSION,
    owners=["team:retailsim"],
)
def basket_samples(
    context: dg.AssetExecutionContext, config: SplitSettings, retailsim_data: RetailSimData
) -> dg.MaterializeResult:
    """One row per basket (ids, week, date, weekday, hour, store, nullable customer, products in line
    order truncated to 50 with the full count kept, line spend and quantities, the four labels),
    split by shop week into train < validation < test (`samples/{train,validation,test}.parquet`).

    Built from every ingested week; streamed a few weeks at a time. Refuses to run while a week's
    latest ingest failed its blocking quarantine check (the weeks are named), and fails with the
    empty split named (weeks available vs asked for) when the data cannot fill all three splits.
    """
    paths = retailsim_data.paths()
    with writer_lock(context, retailsim_data):
        return _basket_samples(context, config, paths)


def _basket_samples(context: dg.AssetExecutionContext, config: SplitSettings, paths) -> dg.MaterializeResult:
    failed = failed_weeks(context.instance)
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} week(s) failed the blocking quarantine check; fix or remove them, "
                        "then ingest again:\n" + "\n".join(w.message() for w in failed)
        )
    result = build_basket_samples(paths.transactions, paths.samples, config)
    weeks = {s: f"{lo} – {hi}" for s, (lo, hi) in ((s, getattr(result.splits, s)) for s in SPLITS)}
    split_table = "\n".join(
        ["| split | baskets | weeks |", "|---|---:|---|"]
        + [f"| {s} | {result.counts[s]:,} | {weeks[s]} |" for s in SPLITS]
    )
    train_preview = read_samples(paths.samples, "train").head(5)
    schema = pl.read_parquet_schema(result.paths["train"])
    context.log.info(f"basket samples: {result.counts}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(result.counts.values()),
            "dagster/column_schema": column_schema(schema, SAMPLE_COLUMN_DOCS),
            **{f"{s}_baskets": result.counts[s] for s in SPLITS},
            **{f"{s}_weeks": weeks[s] for s in SPLITS},
            "splits": dg.MetadataValue.md(split_table),
            "basket_length_histogram": dg.MetadataValue.md(counts_table(result.length_histogram, "lines", "baskets")),
            "lines": result.lines,
            "preview": dg.MetadataValue.md(markdown_table(train_preview)),
            "path": dg.MetadataValue.path(str(paths.samples)),
            "samples_version": result.data_version,
        },
        data_version=dg.DataVersion(result.data_version),
    )


@dg.asset(
    deps=[basket_samples],
    group_name="prep",
    kinds={"numpy", "pytorch"},
    code_version=CACHE_CODE_VERSION,
    owners=["team:retailsim"],
)
def tensor_cache(
    context: dg.AssetExecutionContext, config: CacheSettings, retailsim_data: RetailSimData
) -> dg.MaterializeResult:
    """Every array the world model reads. Fitted on the train split only: vocabulary (PAD, MASK,
    UNK, then products by train frequency), product embeddings [V, 256] (PPMI-SVD of basket
    co-occurrence + hierarchy codes), price normalisers, product neighbours [V, 100], customer profile
    [C, 32], store [S, 96]. Per sample and split: temporal (64) and trip (48) context, the
    point-in-time memory (the 32 products of the customer's earlier baskets, any split, with the
    largest decayed share; the trip context's history likewise), and basket-token CSR arrays.

    A content-addressed folder `cache/<key>/` with `manifest.json`, built under a temporary name and
    renamed; an unchanged input reuses the existing folder. Loaded memory-mapped by `TensorCache.open`.
    """
    paths = retailsim_data.paths()
    with writer_lock(context, retailsim_data):
        result = build_tensor_cache(paths.samples, paths.cache, config)
    m = result.manifest
    rows = ["| array | shape | dtype |", "|---|---|---|"] + [
        f"| {name} | {tuple(meta['shape'])} | {meta['dtype']} |"
        for name, meta in m["arrays"].items()
        if not name.startswith(("validation/", "test/"))
    ]
    context.log.info(f"tensor cache {'reused' if result.reused else 'built'}: {result.path}")
    return dg.MaterializeResult(
        # The value (the folder's path) is what downstream assets receive: lineage, not "the newest folder".
        value=str(result.path),
        metadata={
            # not "path": the IO manager storing the value writes its own "path" entry
            "cache_path": dg.MetadataValue.path(str(result.path)),
            "cache_key": result.key,
            "reused": result.reused,
            "vocab_size": m["sizes"]["vocab"],
            "customers": m["sizes"]["customers"],
            "stores": m["sizes"]["stores"],
            **{f"{s}_samples": m["splits"][s]["n_samples"] for s in SPLITS},
            "fit_weeks": f"{m['fit']['weeks'][0]} – {m['fit']['weeks'][1]}",
            "arrays": dg.MetadataValue.md("\n".join(rows)),
            "upstream_samples_version": m["upstream"]["basket_samples"],
            "config_hash": m["config_hash"],
            "build_seconds": round(result.seconds, 2),
        },
        data_version=dg.DataVersion(result.key),
    )
