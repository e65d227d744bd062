"""End to end through the Dagster webserver + daemon, the way the UI drives them (GraphQL over HTTP).

A temporary instance (a copy of the project's ``dagster.yaml``: queued runs, ``gpu`` pool limit 1) on a
copy of the tiny data: weekly partitions registered and ingested, the rest materialized with the
``tiny`` training preset, metadata and MLflow checked, then two training runs back to back that the
``gpu`` pool must serialise.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ASSETS = ["raw_transactions", "basket_samples", "tensor_cache", "trained_world_model", "evaluation_report"]
GROUPS = {"raw_transactions": "ingest", "basket_samples": "prep", "tensor_cache": "prep",
          "trained_world_model": "training", "evaluation_report": "evaluation"}
DEPS = {"raw_transactions": set(), "basket_samples": {"raw_transactions"}, "tensor_cache": {"basket_samples"},
        "trained_world_model": {"tensor_cache"}, "evaluation_report": {"trained_world_model", "tensor_cache"}}
TRAIN_STEP = "trained_world_model.train_world_model"
RUN_TIMEOUT_S = 150
# The in-process executor: one process per run instead of one more per step (a 2-core machine).
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dagster:
    """The GraphQL endpoint of a running webserver."""

    def __init__(self, port: int, procs: dict[str, subprocess.Popen], logs: dict[str, Path]):
        self.base = f"http://127.0.0.1:{port}"
        self.procs, self.logs = procs, logs
        self.location = self.repository = None

    def log_tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{path.read_text(errors='replace')[-3000:]}"
                         for name, path in self.logs.items())

    def gql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.base}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            doc = json.loads(response.read())
        assert not doc.get("errors"), f"GraphQL errors: {doc['errors']}\nquery: {query}"
        return doc["data"]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{self.log_tails()}"

    # --- runs ------------------------------------------------------------------------------------
    def launch(self, assets: list[str], run_config: dict | None = None, tags: dict | None = None) -> str:
        data = self.gql(LAUNCH_RUN, {"executionParams": {
            "selector": {"repositoryLocationName": self.location, "repositoryName": self.repository,
                         "pipelineName": "__ASSET_JOB", "assetSelection": [{"path": [a]} for a in assets]},
            "runConfigData": run_config or {},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
        }})
        result = data["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", f"launchRun for {assets} failed: {result}"
        return result["run"]["runId"]

    def events(self, run_id: str) -> list[dict]:
        result = self.gql(RUN_LOGS, {"runId": run_id})["logsForRun"]
        assert result["__typename"] == "EventConnection", result
        return result["events"]

    def failure_summary(self, run_id: str) -> str:
        lines = []
        for e in self.events(run_id):
            if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent", "EngineEvent") or \
                    e.get("level") == "ERROR":
                error = e.get("error") or {}
                lines.append(f"{e['__typename']} {e.get('stepKey')}: {e.get('message')} "
                             f"{error.get('message', '')}{''.join(error.get('stack') or [])[-2000:]}")
        return "\n".join(lines[-15:])

    def statuses(self, run_ids: list[str]) -> dict[str, str]:
        result = self.gql(RUN_STATUSES, {"filter": {"runIds": run_ids}})["runsOrError"]
        assert result["__typename"] == "Runs", result
        return {r["runId"]: r["status"] for r in result["results"]}

    def wait_all(self, run_ids: list[str], timeout: float = RUN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            states = self.statuses(run_ids)
            for run_id, status in states.items():
                if status in ("FAILURE", "CANCELED"):
                    pytest.fail(f"run {run_id} ended {status}:\n{self.failure_summary(run_id)}")
            if len(states) == len(run_ids) and all(s == "SUCCESS" for s in states.values()):
                return
            if time.monotonic() > deadline:
                pending = {r: s for r, s in states.items() if s != "SUCCESS"}
                pytest.fail(f"runs not done after {timeout:.0f}s: {pending}\n{self.log_tails()}")
            time.sleep(1.0)


LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message reason } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}"""

RUN_STATUSES = """
query Statuses($filter: RunsFilter) {
  runsOrError(filter: $filter) { __typename ... on Runs { results { runId status } } }
}"""

RUN_LOGS = """
query Logs($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message timestamp level stepKey }
        ... on ExecutionStepFailureEvent { error { message stack } }
        ... on RunFailureEvent { error { message stack } }
      }
    }
    ... on PythonError { message }
  }
}"""

WORKSPACE = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
  }
}"""

ASSET_GRAPH = """
query {
  assetNodes {
    assetKey { path }
    groupName
    description
    dependencyKeys { path }
    isPartitioned
  }
}"""

LATEST_MATERIALIZATIONS = """
query {
  assetNodes {
    assetKey { path }
    assetMaterializations(limit: 1) {
      runId
      metadataEntries {
        label
        __typename
        ... on TextMetadataEntry { text }
        ... on UrlMetadataEntry { url }
        ... on IntMetadataEntry { intValue }
        ... on FloatMetadataEntry { floatValue }
      }
    }
  }
}"""

ADD_PARTITION = """
mutation Add($repositorySelector: RepositorySelector!, $partitionsDefName: String!, $partitionKey: String!) {
  addDynamicPartition(repositorySelector: $repositorySelector, partitionsDefName: $partitionsDefName,
                      partitionKey: $partitionKey) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on DuplicateDynamicPartitionError { partitionName }
  }
}"""

CONCURRENCY = """
query {
  instance {
    concurrencyLimits { concurrencyKey slotCount limit usingDefaultLimit activeSlotCount pendingStepCount }
  }
}"""


def _wait_until_loaded(ui: Dagster, timeout: float = 90) -> None:
    """Until the webserver answers and the code location is loaded (fails on a load error)."""
    deadline = time.monotonic() + timeout
    while True:
        ui.check_alive()
        assert time.monotonic() < deadline, f"webserver not ready after {timeout:.0f}s\n{ui.log_tails()}"
        try:
            with urllib.request.urlopen(f"{ui.base}/server_info", timeout=5) as response:
                if response.status == 200:
                    entries = ui.gql(WORKSPACE)["workspaceOrError"]["locationEntries"]
                    entry = entries[0] if entries else {"loadStatus": None, "locationOrLoadError": None}
                    location = entry["locationOrLoadError"]
                    if location and location["__typename"] == "PythonError":
                        pytest.fail(f"code location failed to load: {location['message']}")
                    if entry["loadStatus"] == "LOADED" and location:
                        ui.location = location["name"]
                        ui.repository = location["repositories"][0]["name"]
                        return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture
def dagster_ui(tiny_copy, tiny_raw, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    shutil.copytree(tiny_raw.ground_truth, tiny_copy.ground_truth)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({
        "DAGSTER_HOME": str(home),
        "RETAILSIM_DAGSTER_DIR": str(tmp_path / "dagster_state"),
        "RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR": str(tmp_path / "dagster_state" / "compute_logs"),
        "RETAILSIM_DATA_DIR": str(tiny_copy.root),
        "PYTHONUNBUFFERED": "1",
    })
    (tmp_path / "dagster_state").mkdir()
    # Create the instance's sqlite storages before the webserver and the daemon start: both would
    # otherwise migrate the fresh databases at once ("alembic_version has more than one head").
    for key in ("DAGSTER_HOME", "RETAILSIM_DAGSTER_DIR", "RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR"):
        monkeypatch.setenv(key, env[key])
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"
    port = _free_port()
    workspace = str(REPO_ROOT / "workspace.yaml")
    commands = {
        "webserver": [str(BIN / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-w", workspace],
    }
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    handles = []
    try:
        for name, command in commands.items():
            logs[name] = tmp_path / f"{name}.log"
            handle = open(logs[name], "wb")
            handles.append(handle)
            procs[name] = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        ui = Dagster(port, procs, logs)
        _wait_until_loaded(ui)
        yield ui
    finally:
        for proc in procs.values():
            _terminate(proc)
        for handle in handles:
            handle.close()


def test_ui_graphql_materializes_everything_and_the_gpu_pool_serialises_training(dagster_ui, tiny_copy):
    ui = dagster_ui
    t0 = time.monotonic()

    # --- the asset graph the UI draws --------------------------------------------------------------
    nodes = {"/".join(n["assetKey"]["path"]): n for n in ui.gql(ASSET_GRAPH)["assetNodes"]}
    assert set(ASSETS) <= set(nodes), f"asset nodes: {sorted(nodes)}"
    for name in ASSETS:
        node = nodes[name]
        assert node["groupName"] == GROUPS[name], f"{name}: group {node['groupName']}"
        assert (node["description"] or "").strip(), f"{name} has no description"
        deps = {"/".join(k["path"]) for k in node["dependencyKeys"]}
        assert deps == DEPS[name], f"{name} depends on {deps}, expected {DEPS[name]}"
    assert nodes["raw_transactions"]["isPartitioned"]

    # --- register the weekly files as partitions (the UI's "add partition") ------------------------
    weeks = sorted(p.stem.removeprefix("transactions_") for p in tiny_copy.raw.glob("transactions_*.csv"))
    assert weeks, "no tiny raw files"
    repo_selector = {"repositoryLocationName": ui.location, "repositoryName": ui.repository}
    for week in weeks:
        added = ui.gql(ADD_PARTITION, {"repositorySelector": repo_selector, "partitionsDefName": "weekly_files",
                                       "partitionKey": week})["addDynamicPartition"]
        assert added["__typename"] == "AddDynamicPartitionSuccess", added

    # --- one run per weekly partition (Materialize, partition picked) ------------------------------
    ingest_runs = [ui.launch(["raw_transactions"], IN_PROCESS, tags={"dagster/partition": week}) for week in weeks]
    ui.wait_all(ingest_runs, timeout=RUN_TIMEOUT_S + 10 * len(weeks))
    print(f"ingest done at {time.monotonic() - t0:.0f}s")
    t_ingest = time.monotonic() - t0

    # --- the unpartitioned rest in one run, tiny training preset -----------------------------------
    tiny = {**IN_PROCESS,
            "ops": {"trained_world_model": {"ops": {"train_world_model": {"config": {"preset": "tiny"}}}}}}
    main_run = ui.launch(["basket_samples", "tensor_cache", "trained_world_model", "evaluation_report"], tiny)
    ui.wait_all([main_run])
    print(f"main run done at {time.monotonic() - t0:.0f}s")
    t_main = time.monotonic() - t0

    latest = {"/".join(n["assetKey"]["path"]): n["assetMaterializations"]
              for n in ui.gql(LATEST_MATERIALIZATIONS)["assetNodes"]}
    for name in ASSETS:
        assert latest[name], f"{name} has no materialization"
    meta = {name: {e["label"]: e for e in latest[name][0]["metadataEntries"]} for name in ASSETS[1:]}
    assert latest["trained_world_model"][0]["runId"] == main_run
    model_meta = meta["trained_world_model"]
    assert {"model_version", "mlflow_run", "mlflow_run_id"} <= set(model_meta), sorted(model_meta)
    assert model_meta["mlflow_run"]["__typename"] == "UrlMetadataEntry" and model_meta["mlflow_run"]["url"]
    model_version = model_meta["model_version"]["text"]
    mlflow_run_id = model_meta["mlflow_run_id"]["text"]
    assert model_version == "1"
    decision = meta["evaluation_report"]["decision"]["text"]
    assert decision in ("champion", "challenger"), decision

    from mlflow import MlflowClient

    uri = f"sqlite:///{tiny_copy.root}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow_run = client.get_run(mlflow_run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags.get("dagster.run_id") == main_run
    version = client.get_model_version("retailsim-world-model", "1")
    assert "challenger" in version.aliases, version.aliases
    assert ("champion" in version.aliases) == (decision == "champion"), (version.aliases, decision)

    # --- two trainings back to back: the gpu pool (limit 1) runs one train step at a time ----------
    longer = {**IN_PROCESS, "ops": {"trained_world_model": {"ops": {"train_world_model": {
        "config": {"preset": "tiny", "epochs": 6}}}}}}
    first = ui.launch(["trained_world_model"], longer)
    second = ui.launch(["trained_world_model"], longer)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen_gpu_limit = None
    observed = []  # (status of first, status of second, active gpu slots, pending gpu steps), for the log
    while time.monotonic() < deadline:
        limits = {c["concurrencyKey"]: c for c in ui.gql(CONCURRENCY)["instance"]["concurrencyLimits"]}
        if "gpu" in limits:
            seen_gpu_limit = limits["gpu"]
            assert seen_gpu_limit["slotCount"] == 1, seen_gpu_limit
            assert seen_gpu_limit["activeSlotCount"] <= 1, seen_gpu_limit
        states = ui.statuses([first, second]).values()
        sample = (*states, *((seen_gpu_limit["activeSlotCount"], seen_gpu_limit["pendingStepCount"])
                             if seen_gpu_limit else (None, None)))
        if not observed or observed[-1] != sample:
            observed.append(sample)
        if any(s in ("FAILURE", "CANCELED") for s in states) or all(s == "SUCCESS" for s in states):
            break
        time.sleep(1.0)
    ui.wait_all([first, second])
    assert seen_gpu_limit is not None, "the gpu pool never showed up in instance.concurrencyLimits"

    def train_window(run_id: str) -> tuple[int, int]:
        events = [e for e in ui.events(run_id) if e.get("stepKey") == TRAIN_STEP]
        start = [int(e["timestamp"]) for e in events if e["__typename"] == "ExecutionStepStartEvent"]
        end = [int(e["timestamp"]) for e in events if e["__typename"] == "ExecutionStepSuccessEvent"]
        assert len(start) == 1 and len(end) == 1, f"{run_id}: {[e['__typename'] for e in events]}"
        return start[0], end[0]

    windows = sorted([train_window(first), train_window(second)])
    assert windows[1][0] >= windows[0][1], f"train steps overlapped despite the gpu pool: {windows}"
    print(f"ingest {t_ingest:.0f}s, main run done at {t_main:.0f}s, total {time.monotonic() - t0:.0f}s, "
          f"train windows {windows}, observed {observed}")


PARTITION_KEYS = """
query {
  assetNodeOrError(assetKey: {path: ["raw_transactions"]}) {
    __typename
    ... on AssetNode { partitionKeys }
  }
}"""


def test_dagster_dev_in_the_project_root_needs_no_variable_and_finds_the_cli_instance(tmp_path, monkeypatch):
    """``dagster dev`` started in the project root with nothing exported (no DAGSTER_HOME, no RETAILSIM_*)
    loads the code location and uses the instance that ``retailsim`` uses: ``./data/dagster``."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO_ROOT / name, project / name)
    # The CLI's view (DAGSTER_HOME = the project, data root = ./data): register a weekly partition.
    for key in ("RETAILSIM_DAGSTER_DIR", "RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(project))
    monkeypatch.setenv("RETAILSIM_DATA_DIR", str(project / "data"))
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("weekly_files", ["200607"])
    assert (project / "data" / "dagster" / "history" / "runs.db").exists()

    env = {k: v for k, v in os.environ.items()
           if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI") and not k.startswith("RETAILSIM_")}
    port = _free_port()
    log = tmp_path / "dagster_dev.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port)], cwd=project,
                                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ui = Dagster(port, {"dagster dev": proc}, {"dagster dev": log})
            _wait_until_loaded(ui, timeout=120)
            node = ui.gql(PARTITION_KEYS)["assetNodeOrError"]
            assert node["__typename"] == "AssetNode", node
            assert node["partitionKeys"] == ["200607"], ui.log_tails()
        finally:
            _terminate(proc)
    text = log.read_text(errors="replace")
    assert "is not set" not in text, text[-3000:]
