"""Resources shared by the assets."""

import dagster as dg

from retailsim_pipeline.config import DataPaths, data_root


class RetailSimData(dg.ConfigurableResource):
    """Where the pipeline's data lives. Empty ``data_dir`` means ``$RETAILSIM_DATA_DIR`` (default ``./data``)."""

    data_dir: str = ""

    def paths(self) -> DataPaths:
        from pathlib import Path

        return DataPaths(Path(self.data_dir).resolve() if self.data_dir else data_root())
