"""Training: batches gathered from the tensor cache, the trainer loop, checkpoints, and the entry point
``python -m retailsim_pipeline.training`` that the ``train_world_model`` op launches through Dagster Pipes.
Never imports dagster or mlflow: metrics go to an injected logger (``tracking.MlflowLogger``)."""
