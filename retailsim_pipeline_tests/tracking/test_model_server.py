"""The registered champion served for real: ``mlflow models serve`` over HTTP, and ``retailsim predict``.

One model is built from the tiny tensor cache, logged with its serving features by ``log_world_model``
in a temporary sqlite store and registered with alias ``champion``. Both the scoring server and the batch
command must answer exactly what ``load_served_model(...).rank`` (``rank_requests``) answers.
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
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

import polars as pl  # noqa: E402
import torch  # noqa: E402

import retailsim_pipeline  # noqa: E402
from retailsim_pipeline import tracking  # noqa: E402
from retailsim_pipeline.cli import main  # noqa: E402
from retailsim_pipeline.config import DATA_DIR_ENV, N_SPECIAL, training_preset  # noqa: E402
from retailsim_pipeline.prep.cache import TensorCache  # noqa: E402
from retailsim_pipeline.prep.requests import ServingFeatures  # noqa: E402
from retailsim_pipeline.training.trainer import build_model  # noqa: E402

CHAMPION = f"models:/{tracking.REGISTERED_MODEL}@champion"
UNKNOWN = "PRD_NOT_IN_VOCAB"
SERVER_START_TIMEOUT = 120.0


@dataclass
class Champion:
    tracking_uri: str
    served: tracking.ServedModel
    requests: list[dict]  # two real test baskets (customer, store, time, products), one anonymous
    unknown: list[int]  # products of each request outside the vocabulary


@pytest.fixture(scope="module")
def champion(tiny_prepped, empty_store, tmp_path_factory) -> Champion:
    root = tmp_path_factory.mktemp("served_store")
    (root / "mlflow").mkdir()
    shutil.copy(empty_store, root / "mlflow" / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    cache = TensorCache.latest(tiny_prepped.cache)
    features = ServingFeatures.from_cache(cache)
    torch.manual_seed(0)
    model = build_model(training_preset("tiny"), cache).eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        with tracking.MlflowLogger(uri, system_metrics=False) as logger:
            model_uri = tracking.log_world_model(logger, model.config.model_dump(), model.state_dict(), features)
        version = tracking.register_world_model(model_uri, alias="champion", tracking_uri=uri)
        assert version.aliases == ("champion",)
        served = tracking.load_served_model(CHAMPION, tracking_uri=uri)

    test = (features.baskets.filter((pl.col("split") == "test") & pl.col("cust_code").is_not_null()
                                    & (pl.col("n_lines") >= 3))
            .sort("date", "hour", "basket_id"))
    requests = [{"customer_code": str(row["cust_code"]), "store_code": str(row["store_code"]),
                 "timestamp": f"{row['date'].isoformat()}T{int(row['hour']):02d}:00:00",
                 "products": [str(p) for p in row["products"][:3]]}
                for row in (test.row(0, named=True), test.row(test.height - 1, named=True))]
    requests.append({"customer_code": None, "store_code": requests[0]["store_code"],
                     "timestamp": requests[0]["timestamp"], "products": [requests[1]["products"][0], UNKNOWN]})
    return Champion(uri, served, requests, [0, 0, 1])


def expected_top_k(champion: Champion, k: int) -> list[list[str]]:
    return [list(t) for t in champion.served.rank(champion.requests, k=k)["top_k"]]


def check_predictions(champion: Champion, top_k, unknown, k: int) -> None:
    products = set(champion.served.vocabulary[N_SPECIAL:])
    assert len(top_k) == len(champion.requests) == 3
    for request, top in zip(champion.requests, top_k):
        assert len(top) == k and len(set(top)) == k
        assert set(top) <= products
        assert not set(top) & set(request["products"])
    assert list(unknown) == champion.unknown
    assert [list(t) for t in top_k] == expected_top_k(champion, k)


# ------------------------------------------------------------------------------------ mlflow models serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # `mlflow` and the `uvicorn` it execs
    source_root = str(Path(retailsim_pipeline.__file__).resolve().parents[1])  # this checkout's package
    env.update({
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(p for p in [source_root, env.get("PYTHONPATH", "")] if p),
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PIP_NO_INDEX": "1",
    })
    env.pop("MLFLOW_REGISTRY_URI", None)
    return env


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_what_rank_requests_ranks(champion, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", CHAMPION,
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log_file:
        # Its own process group: the mlflow CLI and the uvicorn it starts are stopped together.
        server = subprocess.Popen(command, env=server_env(champion.tracking_uri), stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping after {SERVER_START_TIMEOUT:.0f}s:\n{log_path.read_text()}")
            time.sleep(0.5)

        status, answer = post(f"{base}/invocations", {"dataframe_records": champion.requests, "params": {"k": 5}})
        assert status == 200, answer
        predictions = answer["predictions"]
        check_predictions(champion, [p["top_k"] for p in predictions], [p["unknown_products"] for p in predictions], 5)
        expected = champion.served.rank(champion.requests, k=5)
        for p, scores in zip(predictions, expected["scores"]):
            assert p["scores"] == pytest.approx(list(scores), rel=1e-5, abs=1e-5)
            assert p["scores"] == sorted(p["scores"], reverse=True)

        # k defaults to the signature's 10; a request the model cannot read is a 400 naming row and column.
        status, answer = post(f"{base}/invocations", {"dataframe_records": champion.requests[:1]})
        assert status == 200 and len(answer["predictions"][0]["top_k"]) == 10
        bad = [champion.requests[0], {**champion.requests[1], "timestamp": "yesterday"}]
        status, answer = post(f"{base}/invocations", {"dataframe_records": bad})
        assert status == 400
        assert "row 1, column 'timestamp'" in answer["message"], answer

        # An optional per-line column given for some records only: null elsewhere is "not given", but
        # MLflow's schema enforcement rejects a record that lacks the key (NaN) before predict runs.
        first, second = champion.requests[:2]
        given = {**second, "quantities": [2] * len(second["products"])}
        status, answer = post(f"{base}/invocations", {"dataframe_records": [{**first, "quantities": None}, given]})
        assert status == 200, answer
        status, answer = post(f"{base}/invocations", {"dataframe_records": [first, given]})
        assert status == 400 and "quantities" in answer["message"], answer
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)


# ------------------------------------------------------------------------------------ retailsim predict


@pytest.fixture
def cli_env(champion, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion.tracking_uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))


def request_frame(champion: Champion) -> pl.DataFrame:
    return pl.DataFrame(champion.requests, schema={"customer_code": pl.String, "store_code": pl.String,
                                                    "timestamp": pl.String, "products": pl.List(pl.String)})


def csv_cells(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame as ``retailsim predict`` reads a csv: per-line values separated by spaces."""
    return frame.with_columns(pl.col(c).cast(pl.List(pl.String)).list.join(" ")
                              for c in ("products", "quantities", "spend") if c in frame.columns)


def as_csv(frame: pl.DataFrame, path: Path) -> Path:
    csv_cells(frame).write_csv(path)
    return path


def predict(*args) -> int:
    return main(["predict", "--model", CHAMPION, *map(str, args)])


def test_retailsim_predict_scores_parquet_and_csv_like_rank_requests(champion, cli_env, tmp_path, capsys):
    frame = request_frame(champion).with_columns(pl.Series("order_ref", ["a", "b", "c"]))
    frame.write_parquet(tmp_path / "baskets.parquet")
    as_csv(frame, tmp_path / "baskets.csv")
    outs = []
    for name in ("baskets.parquet", "baskets.csv"):
        out = tmp_path / "out" / f"{name}.predictions.parquet"
        assert predict("--input", tmp_path / name, "--out", out, "--k", 5, "--chunk-size", 2) == 0
        result = pl.read_parquet(out)
        assert result.columns == [*frame.columns, "top_k", "scores", "unknown_products"]
        assert result.select(frame.columns).equals(frame)  # the input rows, as given
        check_predictions(champion, result["top_k"].to_list(), result["unknown_products"].to_list(), 5)
        outs.append(result)
    assert outs[0].equals(outs[1])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["baskets.csv.predictions.parquet",
                                                                   "baskets.parquet.predictions.parquet"]
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 2 and summary[0].startswith("wrote 3 predictions (top 5)")

    # quantities and spend as space-separated values in a csv are the per-line lists of the parquet.
    lines = frame.with_columns(pl.Series("quantities", [[2] * len(r["products"]) for r in champion.requests]),
                               pl.Series("spend", [[1.25] * len(r["products"]) for r in champion.requests]))
    lines.write_parquet(tmp_path / "lines.parquet")
    as_csv(lines, tmp_path / "lines.csv")
    for name in ("lines.parquet", "lines.csv"):
        assert predict("--input", tmp_path / name, "--out", tmp_path / f"{name}.out.parquet") == 0
    assert pl.read_parquet(tmp_path / "lines.parquet.out.parquet").equals(pl.read_parquet(tmp_path / "lines.csv.out.parquet"))


@pytest.mark.parametrize(("fmt", "row", "column", "value"), [
    ("csv", 1, "timestamp", "not-a-time"),
    ("csv", 2, "quantities", "1 x"),
    ("parquet", 2, "timestamp", "yesterday"),
    ("parquet", 0, "quantities", [1, 2, 3, 4, 5]),  # more quantities than products
])
def test_retailsim_predict_rejects_a_bad_row_naming_file_row_and_column(champion, cli_env, tmp_path, capsys,
                                                                        fmt, row, column, value):
    frame = request_frame(champion).with_columns(pl.Series("quantities", [[1] * len(r["products"])
                                                                          for r in champion.requests]))
    source = tmp_path / f"baskets.{fmt}"
    base = csv_cells(frame) if fmt == "csv" else frame
    rows = base.to_dicts()
    rows[row][column] = value
    bad = pl.DataFrame(rows, schema=base.schema)
    bad.write_csv(source) if fmt == "csv" else bad.write_parquet(source)
    out = tmp_path / "out" / "predictions.parquet"
    assert predict("--input", source, "--out", out) == 2
    message = capsys.readouterr().err
    assert str(source) in message and f"row {row}" in message and repr(column) in message, message
    if fmt == "csv":
        assert f"(line {row + 2})" in message
    assert not out.parent.exists() or not list(out.parent.iterdir())
