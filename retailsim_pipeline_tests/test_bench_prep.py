"""benchmarks/bench_prep.py's scaling mode (``--preset NAME --weeks N ...``), end to end on a tiny run."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_prep.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_prep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench(work: Path, *args: str) -> tuple[str, dict]:
    """Run the script (children and all) with ``args``, its data and outputs under ``work``."""
    out = work / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--workdir", str(work), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


def _assert_positive_rows(rows: list[dict], weeks: list[int]) -> None:
    assert [r["weeks"] for r in rows] == weeks
    for r in rows:
        for key in ("lines", "baskets", "ingest_seconds", "samples_seconds", "cache_seconds",
                    "prep_lines_per_s", "raw_to_samples_lines_per_s", "peak_rss_mb_raw_to_samples",
                    "peak_rss_mb_cache", "output_bytes"):
            assert r[key] > 0, (r["weeks"], key, r[key])


def test_full_preset_mode_end_to_end(tmp_path):
    """The full preset (5,000 products, 760 stores) scaled down to 300 baskets a week (~9k lines)."""
    stdout, payload = _run_bench(tmp_path, "--preset", "full", "--weeks", "3", "--baskets-per-week", "300")
    assert "RESULT preset=full weeks=3 " in stdout
    _assert_positive_rows(payload["scaling"], [3])
    assert payload["lines"] == payload["generator"]["rows"] == payload["scaling"][0]["lines"]
    cfg = payload["config"]
    assert (cfg["n_weeks"], cfg["baskets_per_week"], cfg["n_products"], cfg["n_stores"]) == (3, 300, 5000, 760)
    assert cfg["n_customers"] == 600  # scaled with the baskets: 500k x 300 / 250k
    assert payload["machine"]["cpu_count"] >= 1
    # one generation, in a folder keyed by the config; the row's outputs are gone (no --keep)
    assert len(list(tmp_path.glob("data-full-3w-seed0-b300-*"))) == 1
    assert not list(tmp_path.glob("run-*"))


def test_preset_mode_gives_one_row_per_weeks_on_one_generation(tmp_path):
    """Several N: the data has the largest N weeks, generated once; each row reads the first N files."""
    stdout, payload = _run_bench(tmp_path, "--preset", "tiny", "--weeks", "4", "3")
    assert "RESULT preset=tiny weeks=3,4 " in stdout
    rows = payload["scaling"]
    _assert_positive_rows(rows, [3, 4])
    assert rows[0]["lines"] < rows[1]["lines"] == payload["generator"]["rows"]
    assert payload["config"]["n_weeks"] == 4
    assert [p.name.split("-")[2] for p in tmp_path.glob("data-*")] == ["4w"]

    # a rerun with the same largest N reuses the generated data
    _, again = _run_bench(tmp_path, "--preset", "tiny", "--weeks", "4")
    assert again["generator"]["reused"] is True
    assert again["scaling"][0]["lines"] == rows[1]["lines"]


def test_preset_mode_refuses_when_the_disk_is_too_small(tmp_path):
    bench = _bench_module()
    plan = {"estimated_lines": 1, "generated_bytes": 0, "present_bytes": 0, "to_generate_bytes": 0,
            "outputs_bytes": 0, "need_bytes": shutil.disk_usage(tmp_path).total + 1}
    with pytest.raises(SystemExit, match="not enough disk"):
        bench.check_disk(tmp_path, plan, tmp_path / "data")


def test_preset_mode_needs_three_weeks():
    with pytest.raises(SystemExit):
        _bench_module().main(["--preset", "full", "--weeks", "2"])
