"""The code location: ``retailsim_pipeline.definitions:defs``. Wiring only."""

import dagster as dg

from retailsim_pipeline.defs.automation import (
    ingest_job,
    new_raw_files_sensor,
    recover_crashed_runs_sensor,
    retrain_job,
    weekly_retrain_schedule,
)
from retailsim_pipeline.defs.checks import prep_checks
from retailsim_pipeline.defs.ingest_assets import raw_transactions
from retailsim_pipeline.defs.prep_assets import basket_samples, tensor_cache
from retailsim_pipeline.defs.resources import RetailSimData, json_io_manager, training_launch_resources
from retailsim_pipeline.defs.evaluation_assets import evaluation_report
from retailsim_pipeline.defs.training_assets import trained_world_model

defs = dg.Definitions(
    assets=[raw_transactions, basket_samples, tensor_cache, trained_world_model, evaluation_report],
    asset_checks=prep_checks,
    jobs=[ingest_job, retrain_job],
    sensors=[new_raw_files_sensor, recover_crashed_runs_sensor],
    schedules=[weekly_retrain_schedule],
    resources={
        "retailsim_data": RetailSimData(),
        # What assets hand each other (folder paths, small JSON documents), as JSON: never pickles.
        "io_manager": json_io_manager,
        # training_pipes_client (a subprocess; a Kubernetes pod with RETAILSIM_TRAINING_LAUNCHER=k8s) and
        # training_pod. Cancelling the run terminates the subprocess (forward_termination); dagster-k8s
        # deletes the pod when its run() returns or raises.
        **training_launch_resources(),
    },
)
