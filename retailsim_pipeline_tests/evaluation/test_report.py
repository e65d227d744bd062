"""Report rendering: markdown, self-contained HTML, atomic writes, rich tables."""

import base64
import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from retailsim_pipeline.config import AUX_HEADS
from retailsim_pipeline.evaluation.report import print_tables, render_html, render_markdown, write_report
from retailsim_pipeline.evaluation.report_tables import gap_closed, headline
from retailsim_pipeline.evaluation.schema import BASELINES, BUCKETS, json_ready, validate_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_empty_buckets_render_as_dashes(doc):
    empty = {key: None for key in doc["model"] if key not in ("aux", "n")} | {"n": 0}
    for scorer in ("model", *BASELINES, "oracle"):
        doc["buckets"]["cold_start"]["anonymous"][scorer] = dict(empty)
    assert "| anonymous | 0 | — | — | — | — | — | — |" in render_markdown(doc)  # a dash, not "None"
    assert len(_decoded_pngs(_walk(render_html(doc)))) == 3  # plots skip the missing values


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
    assert headline(doc) == "Recall@10 0.213: beats blend 0.196 / closes 43 % of the popularity→oracle gap"
    doc["model"]["recall@10"] = 0.15
    doc["oracle"] = None
    assert headline(doc) == "Recall@10 0.150: trails blend 0.196"


def test_markdown_has_the_tables_and_the_decision(doc):
    md = render_markdown(doc)
    assert md.startswith("# Evaluation of retailsim-world-model version 3 (test split)\n")
    assert "**Recall@10 0.213: beats blend 0.196 / closes 43 % of the popularity→oracle gap**" in md
    # ranking table: every scorer a column, every reported metric a row; the best non-oracle value bold
    assert "| metric | model | popularity | personal frequency | co-occurrence | blend | TIFU-KNN | oracle |" in md
    assert "| recall@10 | **0.2130** | 0.1200 | 0.1650 | 0.1840 | 0.1960 | 0.1910 | 0.3350 |" in md
    # the gate: every baseline with its validation and test figures, the difference and its interval
    assert "| blend (strongest on validation) | 0.2000 | 0.1960 | **+0.0170** | [+0.0110, +0.0230] | yes | w_cooc 0.03, w_pop 0 |" in md
    for metric in ("accuracy", "recall@1", "recall@5", "recall@20", "precision@10", "mrr", "ndcg@10"):
        assert re.search(rf"^\| {re.escape(metric)} \|", md, re.M), metric
    assert "| n | 25,000 | 25,000 | 25,000 | 25,000 | 25,000 | 25,000 | 25,000 |" in md
    # bucket tables: every bucket a row with its n and the gap closed
    assert "| bucket | n | model | popularity | personal frequency | co-occurrence | blend | TIFU-KNN | oracle | gap closed |" in md
    for group, names in BUCKETS.items():
        for name in names:
            assert re.search(rf"^\| {re.escape(name)} \| [\d,]+ \|", md, re.M), (group, name)
    assert "| 3-9 | 8,600 | **0.2130** | 0.1200 | 0.1650 | 0.1840 | 0.1960 | 0.1910 | 0.3350 | 43 % |" in md
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
    assert "| metric | model | popularity | personal frequency | co-occurrence | blend | TIFU-KNN |\n" in md
    assert "gap closed" not in md
    assert "there is no champion yet" in md
    assert headline(doc) == "Recall@10 0.213: beats blend 0.196"
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
    assert "Recall@10 0.213: beats blend 0.196 / closes 43 % of the popularity→oracle gap" in text
    assert "Version 3 is promoted to champion." in text
    assert "0.1910" in text
    assert walker.tags.count("table") == 1 + 1 + 3 + 1 + 4  # ranking, gate, 3 bucket groups, aux summary, 4 confusions


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
    broken = copy.deepcopy(doc)
    broken["baselines"].pop("cooccurrence")
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
