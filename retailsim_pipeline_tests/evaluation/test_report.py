"""Report rendering: the metrics.json contract, markdown, self-contained HTML, atomic writes, rich tables."""

import base64
import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from retailsim_pipeline.evaluation.report import (
    AUX_HEADS,
    BASELINES,
    BUCKETS,
    SCHEMA,
    gap_closed,
    headline,
    json_ready,
    print_tables,
    render_html,
    render_markdown,
    validate_metrics,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ranking(recall10: float, n: int, *, scale: float = 1.0) -> dict:
    """Plausible ranking metrics around a given recall@10 (monotone in K, precision = recall / K here
    because each masked position has one relevant product)."""
    r1 = round(recall10 * 0.35 * scale, 4)
    r5 = round(recall10 * 0.75, 4)
    r20 = round(min(1.0, recall10 * 1.3), 4)
    recall = {1: r1, 5: r5, 10: recall10, 20: r20}
    out = {f"recall@{k}": v for k, v in recall.items()}
    out |= {f"precision@{k}": round(v / k, 4) for k, v in recall.items()}
    out |= {"accuracy": r1, "mrr": round(recall10 * 0.5, 4), "ndcg@10": round(recall10 * 0.6, 4), "n": n}
    return out


def aux_head(labels: list[str], confusion: list[list[int]]) -> dict:
    n = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return {"accuracy": round(correct / n, 4), "macro_f1": round(0.9 * correct / n, 4),
            "confusion": confusion, "labels": labels, "n": n}  # fmt: skip


@pytest.fixture
def doc() -> dict:
    recall = {"model": 0.213, "popularity": 0.12, "personal_frequency": 0.165, "cooccurrence": 0.184, "oracle": 0.335}

    def bucket(n: int, shift: float, *, oracle: bool = True) -> dict:
        entry = {name: ranking(round(recall[name] * shift, 4), n) for name in ("model", *BASELINES)}
        entry["oracle"] = ranking(round(recall["oracle"] * shift, 4), n) if oracle else None
        return entry

    model = ranking(recall["model"], 25000)
    model["aux"] = {
        "basket_size": aux_head(["S", "M", "L", "unknown"],
                                [[4100, 600, 90, 10], [700, 5200, 400, 20], [80, 500, 3900, 30], [5, 10, 15, 340]]),
        "price_sensitivity": aux_head(["LA", "MM", "UM", "unknown"],
                                      [[3000, 800, 100, 5], [900, 4800, 700, 10], [150, 900, 3200, 8], [20, 30, 20, 357]]),
        "mission_type": aux_head(["Fill in", "Full Shop", "Small Shop", "Top Up", "XX"],
                                 [[2000, 100, 300, 500, 2], [80, 3100, 200, 90, 1], [400, 300, 2600, 400, 3],
                                  [500, 100, 500, 3700, 4], [5, 5, 5, 5, 93]]),
        "mission_focus": aux_head(["Fresh", "Grocery", "Mixed", "Nonfood", "General", "XX"],
                                  [[1500, 200, 300, 20, 40, 1], [150, 2900, 400, 30, 60, 2], [300, 500, 3300, 80, 90, 3],
                                   [20, 30, 60, 900, 40, 0], [50, 60, 100, 30, 1200, 1], [3, 3, 3, 3, 3, 65]]),
    }  # fmt: skip
    return {
        "schema": SCHEMA,
        "meta": {
            "split": "test", "model_name": "retailsim-world-model", "model_version": "3",
            "model_uri": "models:/retailsim-world-model/3", "mlflow_run_id": "8f2c1e0d9b7a4c3e",
            "cache_key": "c0ffee1234", "n_baskets": 16000, "n_positions": 25000,
            "created": "2025-11-21T08:30:00+00:00", "eval_seed": 1234,
        },  # fmt: skip
        "model": model,
        "baselines": {name: ranking(recall[name], 25000) for name in BASELINES},
        "oracle": ranking(recall["oracle"], 25000),
        "buckets": {
            "cold_start": {"anonymous": bucket(2100, 0.7), "0": bucket(900, 0.6), "1-2": bucket(3400, 0.85),
                           "3-9": bucket(8600, 1.0), "10+": bucket(10000, 1.15)},
            "basket_length": {"2-4": bucket(3000, 0.8), "5-9": bucket(7000, 0.95), "10-19": bucket(9000, 1.05),
                              "20-50": bucket(6000, 1.1)},
            "repeat_vs_explore": {"repeat": bucket(11000, 1.6), "explore": bucket(14000, 0.5)},
        },  # fmt: skip
        "promotion": {
            "metric": "recall@10", "margin": 0.0, "challenger_version": "3", "challenger": 0.213,
            "champion_version": "2", "champion": 0.191, "passed_baseline_check": True, "decision": "champion",
            "reason": "recall@10 0.2130 beats champion 0.1910 by more than the margin 0.0000",
        },  # fmt: skip
    }


@pytest.fixture
def history() -> list[dict]:
    rows = []
    for step in range(0, 1001, 50):
        row = {"step": step, "train/total": 6.0 * 0.998**step + 2.0, "train/lr": min(1.0, step / 200) * 3e-4}
        if step % 200 == 0:
            row["val/loss"] = 6.2 * 0.998**step + 2.1
        rows.append(row)
    return rows


# ---- the contract ---------------------------------------------------------------------------------


def test_validate_accepts_the_realistic_document(doc):
    validate_metrics(doc)


def test_validate_accepts_a_document_without_oracle_and_champion(doc):
    doc["oracle"] = None
    for group in doc["buckets"].values():
        for entry in group.values():
            entry["oracle"] = None
    doc["promotion"] |= {"champion_version": None, "champion": None}
    validate_metrics(doc)


def test_validate_accepts_empty_buckets_with_null_metrics(doc):
    empty = {key: None for key in doc["model"] if key not in ("aux", "n")} | {"n": 0}
    for scorer in ("model", *BASELINES, "oracle"):
        doc["buckets"]["cold_start"]["anonymous"][scorer] = dict(empty)
    validate_metrics(doc)
    assert "| anonymous | 0 | — | — | — | — | — | — |" in render_markdown(doc)  # a dash, not "None"
    assert len(_decoded_pngs(_walk(render_html(doc)))) == 3  # plots skip the missing values


def _broken(doc, edit):
    bad = copy.deepcopy(doc)
    edit(bad)
    return bad


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("promotion"), "document: missing key 'promotion'"),
        (lambda d: d.__setitem__("schema", "retailsim.evaluation/0"), "schema: expected 'retailsim.evaluation/1'"),
        (lambda d: d["model"].pop("recall@20"), "model: missing key 'recall@20'"),
        (lambda d: d["baselines"]["popularity"].pop("mrr"), "baselines.popularity: missing key 'mrr'"),
        (lambda d: d["model"].__setitem__("recall@10", "0.21"), "model.recall@10: expected a number in [0, 1], got '0.21' (str)"),
        (lambda d: d["model"].__setitem__("mrr", 1.5), "model.mrr: expected a number in [0, 1], got 1.5"),
        (lambda d: d["model"].__setitem__("ndcg@10", float("nan")), "model.ndcg@10: expected a number in [0, 1]"),
        (lambda d: d["model"].__setitem__("accuracy", None), "model.accuracy: expected a number in [0, 1], got None"),
        (lambda d: d["model"].__setitem__("n", 25000.0), "model.n: expected a non-negative integer, got 25000.0 (float)"),
        (lambda d: d["model"].__setitem__("n", True), "model.n: expected a non-negative integer, got True (bool)"),
        (lambda d: d["baselines"].__setitem__("bm25", d["baselines"]["popularity"]),
         "baselines: unknown scorer 'bm25' (expected popularity, personal_frequency, cooccurrence)"),
        (lambda d: d["buckets"]["cold_start"]["3-9"].__setitem__("random", d["model"]),
         "buckets.cold_start.3-9: unknown scorer 'random'"),
        (lambda d: d["buckets"]["basket_length"]["5-9"].pop("cooccurrence"),
         "buckets.basket_length.5-9: missing scorer 'cooccurrence'"),
        (lambda d: d["buckets"]["cold_start"].pop("10+"), "buckets.cold_start: missing bucket '10+'"),
        (lambda d: d["buckets"]["cold_start"]["1-2"]["model"].pop("n"), "buckets.cold_start.1-2.model: missing key 'n'"),
        (lambda d: d["buckets"]["repeat_vs_explore"]["repeat"].__setitem__("oracle", None),
         "buckets.repeat_vs_explore.repeat.oracle: is null but the top-level oracle is not"),
        (lambda d: d["model"]["aux"].pop("mission_type"), "model.aux: missing auxiliary head 'mission_type'"),
        (lambda d: d["model"]["aux"]["basket_size"]["confusion"][2].pop(), "model.aux.basket_size.confusion[2]: expected a list of 4 counts"),
        (lambda d: d["model"]["aux"]["basket_size"]["confusion"][1].__setitem__(0, -3),
         "model.aux.basket_size.confusion[1][0]: expected a non-negative integer, got -3"),
        (lambda d: d["model"]["aux"]["mission_focus"].__setitem__("labels", "Fresh"),
         "model.aux.mission_focus.labels: expected a non-empty list of strings"),
        (lambda d: d["meta"].pop("cache_key"), "meta: missing key 'cache_key'"),
        (lambda d: d["meta"].__setitem__("model_version", 3), "meta.model_version: expected str, got 3 (int)"),
        (lambda d: d["meta"].__setitem__("created", "yesterday"), "meta.created: expected an ISO-8601 timestamp, got 'yesterday'"),
        (lambda d: d["promotion"].__setitem__("decision", "promote"), "promotion.decision: expected one of champion, challenger, got 'promote'"),
        (lambda d: d["promotion"].__setitem__("metric", "recall@100"), "promotion.metric: expected one of accuracy"),
        (lambda d: d["promotion"].__setitem__("champion", None), "promotion: champion_version and champion must both be null"),
        (lambda d: d["promotion"].__setitem__("passed_baseline_check", "yes"), "promotion.passed_baseline_check: expected true or false"),
        (lambda d: d.__setitem__("extra", 1), "document: unknown key 'extra'"),
        (lambda d: d.__setitem__("model", [0.2]), "model: expected an object, got [0.2] (list)"),
    ],
)
def test_validate_rejects_broken_documents_precisely(doc, edit, message):
    with pytest.raises(ValueError) as err:
        validate_metrics(_broken(doc, edit))
    assert str(err.value).startswith("metrics document: ")
    assert message in str(err.value)


def test_validate_rejects_numpy_integers_with_a_hint(doc):
    np = pytest.importorskip("numpy")
    doc["model"]["n"] = np.int64(25000)
    with pytest.raises(ValueError, match=r"model\.n: expected a non-negative integer.*int\(\)"):
        validate_metrics(doc)


def test_empty_buckets_with_nan_metrics_are_written_as_null(doc, tmp_path):
    # evaluation.metrics reports NaN for a bucket no position fell into; NaN is not JSON.
    nan = float("nan")
    for scorer in ("model", *BASELINES, "oracle"):
        doc["buckets"]["basket_length"]["20-50"][scorer] = {
            key: nan for key in doc["model"] if key not in ("aux", "n")
        } | {"n": 0}
    with pytest.raises(ValueError, match=r"20-50\.model\.accuracy: .*got nan .*json_ready"):
        validate_metrics(doc)
    validate_metrics(json_ready(doc))
    paths = write_report(doc, tmp_path / "v3")
    written = json.loads(paths["metrics.json"].read_text())
    assert written["buckets"]["basket_length"]["20-50"]["model"]["recall@10"] is None
    assert written == json_ready(doc)


def test_nan_outside_an_empty_bucket_is_still_rejected(doc):
    doc["model"]["mrr"] = float("nan")
    with pytest.raises(ValueError, match=r"model\.mrr: expected a number in \[0, 1\], got nan"):
        validate_metrics(json_ready(doc))


def test_validate_requires_null_bucket_oracles_without_top_level_oracle(doc):
    doc["oracle"] = None
    with pytest.raises(ValueError, match=r"buckets\.cold_start\.anonymous\.oracle: must be null"):
        validate_metrics(doc)


# ---- arithmetic and markdown ----------------------------------------------------------------------


def test_gap_closed():
    assert gap_closed(0.213, 0.12, 0.335) == pytest.approx((0.213 - 0.12) / (0.335 - 0.12))
    assert gap_closed(0.335, 0.12, 0.335) == pytest.approx(1.0)
    assert gap_closed(0.12, 0.12, 0.335) == 0.0
    assert gap_closed(0.10, 0.12, 0.22) == pytest.approx(-0.2)  # worse than popularity: negative
    assert gap_closed(0.2, 0.1, None) is None  # no oracle (real data)
    assert gap_closed(0.2, 0.1, 0.1) is None  # oracle does not beat popularity: no gap
    assert gap_closed(0.2, 0.1, 0.05) is None
    assert gap_closed(None, 0.1, 0.3) is None  # empty bucket


def test_headline(doc):
    assert headline(doc) == "Recall@10 0.213: beats co-occurrence 0.184 / closes 43 % of the popularity→oracle gap"
    doc["model"]["recall@10"] = 0.15
    doc["oracle"] = None
    assert headline(doc) == "Recall@10 0.150: trails co-occurrence 0.184"


def test_markdown_has_the_tables_and_the_decision(doc):
    md = render_markdown(doc)
    assert md.startswith("# Evaluation of retailsim-world-model version 3 (test split)\n")
    assert "**Recall@10 0.213: beats co-occurrence 0.184 / closes 43 % of the popularity→oracle gap**" in md
    # ranking table: every scorer a column, every reported metric a row; the best non-oracle value bold
    assert "| metric | model | popularity | personal frequency | co-occurrence | oracle |" in md
    assert "| recall@10 | **0.2130** | 0.1200 | 0.1650 | 0.1840 | 0.3350 |" in md
    for metric in ("accuracy", "recall@1", "recall@5", "recall@20", "precision@10", "mrr", "ndcg@10"):
        assert re.search(rf"^\| {re.escape(metric)} \|", md, re.M), metric
    assert "| n | 25,000 | 25,000 | 25,000 | 25,000 | 25,000 |" in md
    # bucket tables: every bucket a row with its n and the gap closed
    assert "| bucket | n | model | popularity | personal frequency | co-occurrence | oracle | gap closed |" in md
    for group, names in BUCKETS.items():
        for name in names:
            assert re.search(rf"^\| {re.escape(name)} \| [\d,]+ \|", md, re.M), (group, name)
    assert "| 3-9 | 8,600 | **0.2130** | 0.1200 | 0.1650 | 0.1840 | 0.3350 | 43 % |" in md
    # auxiliary heads and their confusion matrices
    assert "| head | accuracy | macro-F1 | n |" in md
    assert "| actual \\\\ predicted | S | M | L | unknown |" in md
    assert "| S | **4,100** | 600 | 90 | 10 |" in md
    for head in AUX_HEADS:
        assert f"Confusion matrix: {head.replace('_', ' ')}" in md
    # promotion with both numbers
    assert "## Promotion decision" in md
    assert "Version 3 is promoted to champion." in md
    assert "0.2130" in md.split("## Promotion decision")[1] and "0.1910" in md.split("## Promotion decision")[1]


def test_markdown_without_oracle_or_champion(doc):
    doc["oracle"] = None
    for group in doc["buckets"].values():
        for entry in group.values():
            entry["oracle"] = None
    doc["promotion"] |= {"champion_version": None, "champion": None, "decision": "champion"}
    md = render_markdown(doc)
    assert "| metric | model | popularity | personal frequency | co-occurrence |\n" in md
    assert "gap closed" not in md
    assert "there is no champion yet" in md
    assert headline(doc) == "Recall@10 0.213: beats co-occurrence 0.184"
    assert len(_decoded_pngs(_walk(render_html(doc)))) == 3


def test_markdown_escapes_pipes_in_user_text(doc):
    doc["promotion"]["reason"] = "a | b"
    doc["model"]["aux"]["basket_size"]["labels"][0] = "S|XS"
    md = render_markdown(doc)
    assert "| S\\|XS |" in md


# ---- HTML -----------------------------------------------------------------------------------------


class _PageWalker(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _walk(page: str) -> _PageWalker:
    walker = _PageWalker()
    walker.feed(page)
    walker.close()
    assert not walker.errors, walker.errors[:3]
    assert not walker.stack, walker.stack
    return walker


def _decoded_pngs(walker: _PageWalker) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in walker.images), [s[:40] for s in walker.images]
    return [base64.b64decode(src[len(prefix) :], validate=True) for src in walker.images]


def _without_data_uris(page: str) -> str:
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:…", page)


def test_html_is_self_contained_with_four_plots(doc, history):
    page = render_html(doc, history)
    walker = _walk(page)
    pngs = _decoded_pngs(walker)
    assert len(pngs) == 4  # training curves, Recall@K, buckets, confusion matrices
    assert all(png.startswith(PNG_SIGNATURE) and len(png) > 1000 for png in pngs)
    assert not any(b"matplotlib.org" in png for png in pngs)
    lowered = page.lower()
    for forbidden in ("<script", 'src="http', "href=", "@import", "url(", "<link", "<iframe", "<object"):
        assert forbidden not in lowered, forbidden
    assert "http" not in _without_data_uris(page)
    assert {"html", "head", "style", "body", "table"} <= set(walker.tags)
    text = " ".join(walker.text)
    assert "Recall@10 0.213: beats co-occurrence 0.184 / closes 43 % of the popularity→oracle gap" in text
    assert "Version 3 is promoted to champion." in text
    assert "0.1910" in text
    assert walker.tags.count("table") == 1 + 3 + 1 + 4  # ranking, 3 bucket groups, aux summary, 4 confusions


def test_html_without_history_has_three_plots(doc):
    assert len(_decoded_pngs(_walk(render_html(doc, None)))) == 3
    assert len(_decoded_pngs(_walk(render_html(doc, [])))) == 3


def test_html_escapes_user_text_and_never_links_urls(doc):
    doc["meta"]["mlflow_run_url"] = "http://mlflow.local:5000/#/experiments/1/runs/8f2c1e0d9b7a4c3e"
    doc["promotion"]["reason"] = '<script>alert("x")</script> & more'
    doc["model"]["aux"]["mission_type"]["labels"][0] = "<b>Fill in</b>"
    validate_metrics(doc)
    page = render_html(doc)
    walker = _walk(page)
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    assert "http://mlflow.local:5000/#/experiments/1/runs/8f2c1e0d9b7a4c3e" in " ".join(walker.text)
    assert not any(value and "http" in value for _, value in walker.attrs if value and not value.startswith("data:"))
    assert 'src="http' not in page and 'href="http' not in page and "href=" not in page


# ---- files ----------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_report_writes_three_files_atomically(doc, history, tmp_path):
    out = tmp_path / "reports" / "v3"
    latest = tmp_path / "reports" / "latest"
    paths = write_report(doc, out, history=history, latest_dir=latest)

    assert paths == {"report.md": out / "report.md", "report.html": out / "report.html", "metrics.json": out / "metrics.json"}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.md"]
    assert _leftovers(out.parent) == []  # no temporary or old folders left behind
    text = paths["metrics.json"].read_text()
    assert json.loads(text) == doc
    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert sorted(p.name for p in latest.iterdir()) == sorted(p.name for p in out.iterdir())
    for path in out.iterdir():
        assert (latest / path.name).read_bytes() == path.read_bytes()
    assert len(_decoded_pngs(_walk(paths["report.html"].read_text()))) == 4


def test_write_report_replaces_a_previous_report_whole(doc, tmp_path):
    out, latest = tmp_path / "v3", tmp_path / "latest"
    write_report(doc, out, latest_dir=latest)
    (out / "stale.txt").write_text("from an older run")
    (latest / "stale.txt").write_text("from an older run")

    doc["promotion"] |= {"decision": "challenger", "reason": "did not beat the champion by the margin"}
    paths = write_report(doc, out, latest_dir=latest)

    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.md"]
    assert sorted(p.name for p in latest.iterdir()) == ["metrics.json", "report.html", "report.md"]
    assert json.loads((latest / "metrics.json").read_text())["promotion"]["decision"] == "challenger"
    assert "Version 3 stays challenger." in paths["report.md"].read_text()
    assert _leftovers(tmp_path) == []


def test_write_report_validates_first_and_leaves_the_old_report(doc, tmp_path):
    out = tmp_path / "v3"
    write_report(doc, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = _broken(doc, lambda d: d["baselines"].pop("cooccurrence"))
    with pytest.raises(ValueError, match="baselines: missing scorer 'cooccurrence'"):
        write_report(broken, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


# ---- terminal -------------------------------------------------------------------------------------


def test_print_tables_shows_the_numbers(doc):
    console = Console(record=True, width=140, color_system=None)
    print_tables(doc, console)
    out = console.export_text()
    assert "Model vs baselines (test, 25,000 positions)" in out
    assert "Cold start (customer's prior trips): recall@10" in out
    for label in ("model", "popularity", "personal frequency", "co-occurrence", "oracle", "anonymous", "10+", "3-9"):
        assert label in out
    for number in ("0.2130", "0.1200", "0.1650", "0.1840", "0.3350", "2,100", "10,000", "43 %"):
        assert number in out
    assert "Version 3 is promoted to champion." in out
    assert "┏" in out and "┃" in out  # rich's heavy-head box, as in seed 002
