"""The Dagster side of a training process, and the only module of ``training`` that imports
``dagster_pipes``: the trainer and ``run.py`` never see Dagster.

The op ``train_world_model`` (``defs/training_assets.py``) launches ``python -m
retailsim_pipeline.training`` through Dagster Pipes. Rank 0 opens the Pipes channel, takes its
parameters from the ``extras``, forwards log lines and reports the summary as a custom message;
other torchrun ranks read the same parameters from ``RETAILSIM_TRAINING_PARAMS`` and train without a
channel. On several machines the op launches node 0; should the rendezvous give its first process
another rank than 0 (c10d orders the nodes by host name), that process opens the channel only to
fail with the reason, since rank 0 (the one that exports and reports the model) is elsewhere.
"""

import json
import os
from collections.abc import Callable

#: The parameters, for ranks without a Pipes channel (set by the op beside the Pipes variables).
PARAMS_ENV = "RETAILSIM_TRAINING_PARAMS"


def launched_by_dagster() -> bool:
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR

    return DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ


def misplaced_rank(environ=os.environ) -> str | None:
    """Why this process cannot report to Dagster, or None: the first process (LOCAL_RANK 0) of the node
    Dagster launched must hold global rank 0."""
    rank, local_rank = int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0"))
    if local_rank != 0 or rank == 0:
        return None
    return (f"the node launched by Dagster got global rank {rank} (node {environ.get('GROUP_RANK', '?')}) from the "
            "rendezvous, but rank 0, which exports and reports the model, must run on it: use rdzv_backend 'static' "
            "(node_rank 0 then holds rank 0); under c10d torch orders the nodes by host name and ignores node_rank")


def run_under_dagster(run_training: Callable[..., dict]) -> int:
    """Train with the parameters Dagster passed; rank 0 reports the summary back."""
    from dagster_pipes import open_dagster_pipes

    problem = misplaced_rank()
    if int(os.environ.get("RANK", "0")) != 0 and problem is None:  # other torchrun ranks: no channel
        run_training(json.loads(os.environ[PARAMS_ENV]))
        return 0
    with open_dagster_pipes() as pipes:
        if problem is not None:
            raise RuntimeError(problem)  # reported to Dagster as the process's failure
        params = dict(pipes.extras)
        pipes.log.info(f"training {params['config'].get('preset')} on {params['cache_path']}")
        summary = run_training(params, progress=False, on_log=pipes.log.info)
        pipes.report_custom_message(summary)
    return 0
