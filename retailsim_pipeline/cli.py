"""``retailsim`` — the command line (also ``python -m retailsim_pipeline``).

- ``retailsim generate --preset {tiny,demo,full} [--seed N] [--out DIR]``: write LGSR-format data.
- ``retailsim run [--select SELECTION]``: materialize assets in-process on the project's Dagster
  instance (``dagster.yaml``): new weekly raw files are registered as partitions first, every
  partition that is missing or whose file changed is materialized, then the selected
  unpartitioned assets that are missing or whose upstream changed in this run.
- ``retailsim train [...]``: train standalone from a tensor cache (``--help`` for its options).
- ``retailsim where``: where the outputs are and how to open the UI.
"""

import argparse
import logging
import os
from pathlib import Path

from retailsim_pipeline.config import DATA_DIR_ENV, DataPaths, data_root, generator_preset

log = logging.getLogger("retailsim")

REPO_ROOT = Path(__file__).resolve().parents[1]


def configure_instance_env(data_dir: Path) -> None:
    """Point Dagster at the project's instance: ``DAGSTER_HOME`` (the folder of ``dagster.yaml``) and
    the state folders under the data root that ``dagster.yaml`` reads from the environment."""
    if "DAGSTER_HOME" not in os.environ:
        if not (REPO_ROOT / "dagster.yaml").exists():
            raise SystemExit("DAGSTER_HOME is not set and no dagster.yaml beside the package; "
                             "set DAGSTER_HOME to the folder that holds the project's dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(REPO_ROOT)
    os.environ.setdefault("RETAILSIM_DAGSTER_DIR", str(data_dir / "dagster"))
    os.environ.setdefault("RETAILSIM_DAGSTER_COMPUTE_LOGS_DIR", str(data_dir / "dagster" / "compute_logs"))
    Path(os.environ["RETAILSIM_DAGSTER_DIR"]).mkdir(parents=True, exist_ok=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from retailsim_pipeline.prep.generator import generate

    out = Path(args.out).resolve() if args.out else data_root()
    config = generator_preset(args.preset, args.seed)
    summary = generate(config, out, progress=not args.quiet)
    verb = "reused" if summary.reused else "wrote"
    print(f"{verb} {summary.rows:,} rows, {summary.baskets:,} baskets, {summary.customers:,} customers in "
          f"{summary.weeks} weekly files under {out / 'raw'} ({summary.seconds:.1f}s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    paths = DataPaths(data_root())
    configure_instance_env(paths.root)
    from retailsim_pipeline.defs.runner import materialize_selection

    report = materialize_selection(args.select, paths, progress=not args.quiet, log_level=args.dagster_log_level,
                                   training_preset=args.preset)
    for line in report.lines():
        print(line)
    return 0 if report.success else 1


def cmd_train(args: argparse.Namespace) -> int:
    from retailsim_pipeline.training.run import main as training_main

    return training_main(args.rest)


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
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="materialize assets on the project's Dagster instance")
    run.add_argument("--select", default="*", help="Dagster asset selection, e.g. 'key:basket_samples+' "
                     "or 'group:prep' (default: every asset)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--dagster-log-level", default="WARNING", help="level of Dagster's console event log")
    run.add_argument("--preset", choices=["tiny", "demo", "seed"], default="demo", help="training preset")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train standalone from a tensor cache (python -m retailsim_pipeline.training)",
                           add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=cmd_train)

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
