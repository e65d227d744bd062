"""``retailsim`` — the command line (also ``python -m retailsim_pipeline``).

- ``retailsim generate --preset {tiny,demo,full} [--seed N] [--out DIR]``: write LGSR-format data.
- ``retailsim run [--select SELECTION] [--wait]``: materialize assets in-process on the project's Dagster
  instance (``dagster.yaml``): new weekly raw files are registered as partitions first, every
  partition that is missing or whose file changed is materialized, then the selected
  unpartitioned assets that are missing or whose upstream changed in this run. One writer per data
  folder: while another run holds it, exits saying which (or waits, with ``--wait``).
- ``retailsim train [...]``: train standalone from a tensor cache (``--help`` for its options).
- ``retailsim evaluate MODEL_URI [--split test]``: rich tables of the model vs the baselines (and the
  oracle on generated data), and the same report as the ``evaluation_report`` asset.
- ``retailsim predict --model URI --input FILE --out FILE [--k 10]``: batch scoring of requests (csv or
  parquet) by a logged or registered model, the served model's own ranking; writes parquet atomically.
- ``retailsim ui``: the Dagster UI and the MLflow UI on 127.0.0.1, printing both URLs; Ctrl-C stops both.
- ``retailsim where``: where the outputs are and how to open the UI.
"""

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from retailsim_pipeline.config import DATA_DIR_ENV, N_SPECIAL, DataPaths, data_root, generator_preset

log = logging.getLogger("retailsim")

REPO_ROOT = Path(__file__).resolve().parents[1]


def configure_instance_env(data_dir: Path) -> None:
    """Point Dagster at the project's instance: ``DAGSTER_HOME`` is the folder of ``dagster.yaml``, whose
    storage classes keep the state under ``data_dir/dagster`` (:mod:`retailsim_pipeline.defs.instance`)."""
    if "DAGSTER_HOME" not in os.environ:
        if not (REPO_ROOT / "dagster.yaml").exists():
            raise SystemExit("DAGSTER_HOME is not set and no dagster.yaml beside the package; "
                             "set DAGSTER_HOME to the folder that holds the project's dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(REPO_ROOT)
    os.environ[DATA_DIR_ENV] = str(data_dir)


def cmd_generate(args: argparse.Namespace) -> int:
    from retailsim_pipeline.prep.generator import generate

    out = Path(args.out).resolve() if args.out else data_root()
    config = generator_preset(args.preset, args.seed)
    summary = generate(config, out, progress=not args.quiet, compress=args.gzip)
    verb = "reused" if summary.reused else "wrote"
    print(f"{verb} {summary.rows:,} rows, {summary.baskets:,} baskets, {summary.customers:,} customers in "
          f"{summary.weeks} weekly files under {out / 'raw'} ({summary.seconds:.1f}s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from retailsim_pipeline.prep.files import DataFolderBusy, DataFolderLock

    paths = DataPaths(data_root())
    configure_instance_env(paths.root)
    # One writer per data folder: a second `retailsim run` exits (or, with --wait, waits) instead of
    # ingesting every week again and racing on the samples and the cache.
    lock = DataFolderLock(paths.root)
    try:
        lock.acquire(wait=args.wait, on_wait=lambda message: print(message, flush=True))
    except DataFolderBusy as exc:
        print(f"{exc}; try again when it has finished, or pass --wait", flush=True)
        return 1
    try:
        from retailsim_pipeline.defs.runner import materialize_selection

        report = materialize_selection(args.select, paths, progress=not args.quiet,
                                       log_level=args.dagster_log_level, training_preset=args.preset)
    finally:
        lock.release()
    for line in report.lines():
        print(line)
    return 0 if report.success else 1


def cmd_train(args: argparse.Namespace) -> int:
    from retailsim_pipeline.training.run import main as training_main

    return training_main(args.rest)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from retailsim_pipeline import tracking
    from retailsim_pipeline.config import EvaluationConfig
    from retailsim_pipeline.evaluation.evaluate import evaluate, rescore_model
    from retailsim_pipeline.evaluation.oracle import OracleScorer
    from retailsim_pipeline.evaluation.promotion import metrics_document
    from retailsim_pipeline.evaluation.report import print_tables, write_report
    from retailsim_pipeline.prep.cache import TensorCache

    paths = DataPaths(data_root())
    uri = tracking.default_tracking_uri(paths)
    # The evaluation_report asset's defaults (masking seed and rate, promotion metric and margin), on --split.
    config = EvaluationConfig(split=args.split)
    cache = TensorCache.open(Path(args.cache)) if args.cache else TensorCache.latest(paths.cache)
    model, _ = tracking.load_world_model(args.model_uri, tracking_uri=uri)
    oracle = OracleScorer(cache, config.split, paths.ground_truth) if (paths.ground_truth / "world.npz").exists() \
        else None
    result = evaluate(cache, cache.samples_dir, model, split=config.split, seed=config.seed,
                      mask_rate=config.mask_rate, oracle=oracle, bootstrap_resamples=config.bootstrap_resamples,
                      bootstrap_confidence=config.bootstrap_confidence)
    champion_version = tracking.get_alias_version("champion", tracking_uri=uri)
    champion = None
    if champion_version is not None:
        champion_served, _ = tracking.load_champion(champion_version, tracking_uri=uri)
        if champion_served is not None:
            champion = rescore_model(result["_setup"], champion_served)[config.promotion_metric]
    label = args.model_uri.replace("models:/", "").replace("/", "-").replace("@", "-")
    doc = metrics_document(
        result, config=config, challenger_version=label, champion_version=champion_version, champion=champion,
        model_name=tracking.REGISTERED_MODEL, model_uri=args.model_uri, mlflow_run_id=None,
        cache_key=cache.manifest["key"],
        reason_note="retailsim evaluate reports only; aliases are changed by the evaluation_report asset")
    print_tables(doc)
    out = Path(args.out) if args.out else paths.root / "reports" / f"cli-{label}"
    written = write_report(doc, out)
    print(f"report: {written.get('report.html', out)}")
    return 0


PREDICTION_COLUMNS = ("top_k", "scores", "unknown_products")


def _shift_rows(message: str, offset: int, csv: bool) -> str:
    """``row i`` of a chunk's message → the file's row (and, for a csv, its line)."""
    def sub(match: re.Match) -> str:
        i = int(match[1]) + offset
        return f"row {i} (line {i + 2})" if csv else f"row {i}"

    return re.sub(r"\brow (\d+)", sub, message)


def _input_error(message: str) -> int:
    print(f"retailsim predict: error: {message}", file=sys.stderr, flush=True)
    return 2


def cmd_predict(args: argparse.Namespace) -> int:
    """Score every request of ``--input`` with the model's own ranking (:func:`~retailsim_pipeline.tracking.
    rank_requests`, what ``mlflow models serve`` answers) and write the rows with ``top_k``, ``scores`` and
    ``unknown_products`` to ``--out``. Bad input: exit 2, a message naming the file, row and column, and
    nothing written."""
    import polars as pl

    from retailsim_pipeline import tracking
    from retailsim_pipeline.prep.files import write_parquet_atomic
    from retailsim_pipeline.prep.requests import REQUEST_COLUMNS, read_requests

    started = time.perf_counter()
    source, out = Path(args.input), Path(args.out)
    csv = source.suffix.lower() == ".csv"
    if args.k < 1 or args.chunk_size < 1:
        return _input_error(f"--k and --chunk-size must be at least 1, got {args.k} and {args.chunk_size}")
    try:
        frame = read_requests(source)
    except ValueError as err:
        return _input_error(str(err))
    clash = [c for c in PREDICTION_COLUMNS if c in frame.columns]
    if clash:
        return _input_error(f"{source}: the input already has the output column(s) {clash}")
    if frame.height == 0:
        return _input_error(f"{source}: no rows")
    requests = frame.select(c for c in REQUEST_COLUMNS if c in frame.columns)
    log.info("read %s requests from %s", f"{frame.height:,}", source)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # progress via logging only
    uri = tracking.default_tracking_uri(DataPaths(data_root()))
    served = tracking.load_served_model(args.model, tracking_uri=uri, device=args.device)
    if served.features is None:
        print(f"retailsim predict: error: {args.model} was logged without its serving features and cannot "
              "score requests", file=sys.stderr, flush=True)
        return 1
    log.info("model %s: %s products", args.model, f"{len(served.vocabulary) - N_SPECIAL:,}")
    try:
        served.features.normalize(requests)  # every row checked before any scoring; rows are the file's rows
    except ValueError as err:
        return _input_error(f"{source}: {_shift_rows(str(err), 0, csv)}")

    parts = []
    for lo in range(0, frame.height, args.chunk_size):
        chunk = requests.slice(lo, args.chunk_size)
        try:
            parts.append(served.rank(chunk, args.k))
        except ValueError as err:
            return _input_error(f"{source}: {_shift_rows(str(err), lo, csv)}")
        log.info("scored %s/%s requests", f"{lo + chunk.height:,}", f"{frame.height:,}")
    top = [list(t) for p in parts for t in p["top_k"]]
    scores = [list(map(float, v)) for p in parts for v in p["scores"]]
    unknown = [int(u) for p in parts for u in p["unknown_products"]]
    result = frame.with_columns(pl.Series("top_k", top, dtype=pl.List(pl.String)),
                                pl.Series("scores", scores, dtype=pl.List(pl.Float64)),
                                pl.Series("unknown_products", unknown, dtype=pl.Int64))
    write_parquet_atomic(result, out)
    k = len(top[0])
    print(f"wrote {result.height:,} predictions (top {k}) of {args.model} to {out} "
          f"({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The Dagster UI (webserver + daemon) and the MLflow UI on the project's stores, until Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    paths = DataPaths(data_root())
    configure_instance_env(paths.root)
    # Create the instance's sqlite storage once, here: the webserver and the daemon starting together on
    # an empty folder would both run its migrations and can fail the code location.
    import dagster as dg

    dg.DagsterInstance.get().dispose()
    paths.mlflow.mkdir(parents=True, exist_ok=True)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow / 'mlflow.db'}"
    bin_dir = Path(sys.executable).parent
    commands = {
        "Dagster": [str(bin_dir / "dagster"), "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
                    "-h", "127.0.0.1", "-p", str(args.dagster_port)],
        "MLflow": [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking_uri,
                   "--default-artifact-root", (paths.mlflow / "artifacts").as_uri(),
                   "--host", "127.0.0.1", "--port", str(args.mlflow_port)],
    }
    def stop(_signum, _frame):  # SIGTERM (a supervisor, `timeout`) stops both like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    # Own process groups, so each tool gets one clean SIGINT from us (and its children with it).
    procs = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in commands.items()}
    print(f"Dagster UI: http://127.0.0.1:{args.dagster_port}   MLflow UI: http://127.0.0.1:{args.mlflow_port}   "
          "(Ctrl-C stops both)", flush=True)
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        failed = [name for name, p in procs.items() if p.poll() not in (None, 0)]
        if failed:
            print(f"{', '.join(failed)} exited; stopping the other", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    return 0


def cmd_where(args: argparse.Namespace) -> int:
    paths = DataPaths(data_root())
    rows = [
        ("raw weekly files", paths.raw), ("quarantined rows", paths.quarantine),
        ("typed transactions", paths.transactions), ("basket samples", paths.samples),
        ("tensor cache", paths.cache), ("Dagster instance", paths.dagster),
    ]
    print("RetailSim outputs:")
    for name, path in rows:
        print(f"  {name:20s} {path}{'' if path.exists() else '  (not yet written)'}")
    latest = paths.cache / "LATEST"
    if latest.exists():
        print(f"  {'latest cache':20s} {paths.cache / latest.read_text().strip()}")
    print("\nOpen the Dagster UI on this instance:  make ui   (then http://127.0.0.1:3000)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retailsim", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write generated LGSR-format weekly files")
    gen.add_argument("--preset", choices=["tiny", "demo", "full"], default="demo")
    gen.add_argument("--seed", type=int, default=None, help="default: the preset's seed (0)")
    gen.add_argument("--out", default=None, help=f"data root (default ${DATA_DIR_ENV} or ./data)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--gzip", action="store_true", help="write transactions_YYYYWW.csv.gz (gzip level 1, a quarter "
                     "of the disk; the full preset's 117 weeks are ~48 GB as plain CSV)")
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="materialize assets on the project's Dagster instance")
    run.add_argument("--select", default="*", help="Dagster asset selection, e.g. 'key:basket_samples+' "
                     "or 'group:prep' (default: every asset)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--dagster-log-level", default="WARNING", help="level of Dagster's console event log")
    run.add_argument("--preset", choices=["tiny", "demo", "seed"], default="demo", help="training preset")
    run.add_argument("--wait", action="store_true", help="when another run writes to the data folder, wait for it "
                     "instead of exiting")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train standalone from a tensor cache (python -m retailsim_pipeline.training)",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="score a model against the baselines and the oracle, print tables, "
                        "write a report")
    ev.add_argument("model_uri", help="e.g. models:/retailsim-world-model@challenger or models:/retailsim-world-model/3")
    ev.add_argument("--split", default="test", choices=["test", "validation"])
    ev.add_argument("--cache", default=None, help="tensor cache folder (default: the latest)")
    ev.add_argument("--out", default=None, help="report folder (default: DATA/reports/cli-<model>)")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser(
        "predict", help="score baskets (csv or parquet) with a logged or registered model, write parquet",
        description="Score one request per row with the model's served ranking (what `mlflow models serve` "
        "answers) and write the input rows plus top_k, scores and unknown_products to --out (parquet, "
        "written atomically). Columns: customer_code (optional; empty = anonymous), store_code, timestamp "
        "(ISO date-time), products, optional quantities and spend (one value per product), optional "
        "basket_id; other columns are carried through. Parquet: products/quantities/spend are list columns. "
        "CSV: every value is text, and products/quantities/spend hold the basket's values separated by "
        "spaces, e.g. 'PRD0900001 PRD0900002', '1 2', '1.50 0.99' (an empty products cell is an empty "
        "basket). A bad value exits with code 2, naming the file, row (from 0, header excluded) and "
        "column, and writes nothing.")
    pr.add_argument("--model", required=True,
                    help="models:/retailsim-world-model@champion, models:/retailsim-world-model/3 or models:/m-<id>")
    pr.add_argument("--input", required=True, help="requests, .csv or .parquet")
    pr.add_argument("--out", required=True, help="predictions .parquet (replaced atomically)")
    pr.add_argument("--k", type=int, default=10, help="products per basket (default 10)")
    pr.add_argument("--chunk-size", type=int, default=10_000, help="requests scored per chunk (default 10000)")
    pr.add_argument("--device", default="cpu", help="torch device (default cpu)")
    pr.set_defaults(func=cmd_predict)

    ui = sub.add_parser("ui", help="the Dagster UI and the MLflow UI on 127.0.0.1 (Ctrl-C stops both)")
    ui.add_argument("--dagster-port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    where = sub.add_parser("where", help="where the outputs are and how to open the UI")
    where.set_defaults(func=cmd_where)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Dagster's sqlite migrations
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
