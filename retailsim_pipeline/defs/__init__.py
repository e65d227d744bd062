"""The Dagster layer: the only package that imports dagster. It wires plain functions from
``prep`` (and later ``training``/``evaluation``) into assets, checks, resources, jobs, schedules
and sensors; no data logic lives here."""
