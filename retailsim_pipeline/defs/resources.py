"""Resources shared by the assets."""

import dagster as dg

from retailsim_pipeline.config import DataPaths, data_root


class RetailSimData(dg.ConfigurableResource):
    """Where the pipeline's data lives. Empty ``data_dir`` means ``$RETAILSIM_DATA_DIR`` (default ``./data``)."""

    data_dir: str = ""

    def paths(self) -> DataPaths:
        from pathlib import Path

        return DataPaths(Path(self.data_dir).resolve() if self.data_dir else data_root())


def writer_lock(context: dg.AssetExecutionContext, data: RetailSimData):
    """The data folder's writer lock, waited for with a line in the run's log (re-entrant under
    ``retailsim run``, which already holds it)."""
    from retailsim_pipeline.prep.files import DataFolderLock

    return DataFolderLock(data.paths().root, wait=True, on_wait=context.log.info)


class JsonIOManager(dg.IOManager):
    """Stores what assets hand each other (folder paths, small JSON documents) as JSON files.

    Never pickles: a value that is not JSON (str, number, bool, None, list, dict) is a TypeError
    naming the output. Files live under ``DATA/dagster/values/``: an asset's value at
    ``<asset key>/<partition or __all__>.json``, an op's intermediate output (inside the training graph
    asset) at ``runs/<run id>/<step>/<output>.json``. Large data never passes here: assets exchange
    folders (the tensor cache) and read their files themselves.
    """

    def __init__(self, root):
        from pathlib import Path

        self.root = Path(root)

    def _path(self, context):
        if context.has_asset_key:
            leaf = context.asset_partition_key if context.has_asset_partitions else "__all__"
            return self.root.joinpath(*context.asset_key.path, f"{leaf}.json")
        return self.root.joinpath("runs", *context.get_run_scoped_output_identifier()).with_suffix(".json")

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        import json
        import os

        path = self._path(context)
        try:
            text = json.dumps(obj, indent=1)
        except TypeError as exc:
            raise TypeError(f"output {context.name!r} is not JSON ({type(obj).__name__}); assets pass folder "
                            f"paths and small JSON documents between them: {exc}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        context.add_output_metadata({"value_path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext):
        import json

        upstream = context.upstream_output
        path = self._path(upstream if upstream is not None else context)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no stored value for input {context.name!r}; materialize its "
                                    "upstream asset first")
        return json.loads(path.read_text())


@dg.io_manager(required_resource_keys={"retailsim_data"},
               description="JSON files under DATA/dagster/values (paths and small documents; never pickles).")
def json_io_manager(init_context) -> JsonIOManager:
    return JsonIOManager(init_context.resources.retailsim_data.paths().dagster / "values")
