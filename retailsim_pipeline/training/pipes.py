"""The Dagster side of a training process, and the only module of ``training`` that imports
``dagster_pipes``: the trainer and ``run.py`` never see Dagster.

The op ``train_world_model`` (``defs/training_assets.py``) launches ``python -m
retailsim_pipeline.training`` through Dagster Pipes. Rank 0 opens the Pipes channel, takes its
parameters from the ``extras``, forwards log lines and reports the summary as a custom message;
other torchrun ranks read the same parameters from ``RETAILSIM_TRAINING_PARAMS`` and train without a
channel.
"""

import json
import os
from collections.abc import Callable

#: The parameters, for ranks without a Pipes channel (set by the op beside the Pipes variables).
PARAMS_ENV = "RETAILSIM_TRAINING_PARAMS"


def launched_by_dagster() -> bool:
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR

    return DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ


def run_under_dagster(run_training: Callable[..., dict]) -> int:
    """Train with the parameters Dagster passed; rank 0 reports the summary back."""
    from dagster_pipes import open_dagster_pipes

    if int(os.environ.get("RANK", "0")) != 0:  # other torchrun ranks: same parameters, no channel
        run_training(json.loads(os.environ[PARAMS_ENV]))
        return 0
    with open_dagster_pipes() as pipes:
        params = dict(pipes.extras)
        pipes.log.info(f"training {params['config'].get('preset')} on {params['cache_path']}")
        summary = run_training(params, progress=False, on_log=pipes.log.info)
        pipes.report_custom_message(summary)
    return 0
