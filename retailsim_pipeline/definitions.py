"""The code location: ``retailsim_pipeline.definitions:defs``. Wiring only."""

import dagster as dg

from retailsim_pipeline.defs.checks import prep_checks
from retailsim_pipeline.defs.ingest_assets import raw_transactions
from retailsim_pipeline.defs.prep_assets import basket_samples, tensor_cache
from retailsim_pipeline.defs.resources import RetailSimData

defs = dg.Definitions(
    assets=[raw_transactions, basket_samples, tensor_cache],
    asset_checks=prep_checks,
    resources={"retailsim_data": RetailSimData()},
)
