"""The evaluation report: the ``metrics.json`` contract, its validator, and its renderings.

``metrics.json`` (schema :data:`SCHEMA`) is the stable contract other tools read; :func:`validate_metrics`
states it in code and names the exact key that is wrong. Everything else here renders one validated
document:

- :func:`render_markdown` — ``report.md`` (headline, ranking table, bucket tables, auxiliary heads with
  confusion matrices, promotion decision);
- :func:`render_html` — ``report.html``, the same tables plus PNG plots embedded as ``data:`` URIs. The
  page is self-contained: inline CSS, no scripts, no external URLs (a URL the caller put in ``meta`` is
  shown as escaped text, never as a link or a source);
- :func:`print_tables` — rich tables in the terminal;
- :func:`write_report` — the three files written into a versioned folder (and optionally a ``latest``
  copy), each folder replaced as a whole by renames so readers never see a half-written report.

The tables are built once (:func:`_sections`) and rendered three ways, so markdown, HTML and terminal
always agree. Plots use matplotlib's object API (``Figure`` + Agg), never ``pyplot``'s global state.
"""

import base64
import html
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from rich.text import Text

from retailsim_pipeline.training.curves import plot_training_curves, png_bytes

log = logging.getLogger(__name__)

SCHEMA = "retailsim.evaluation/1"

# Ranking metrics every scorer reports on the same masked positions; "n" is the number of positions.
RANKING_METRICS = (
    "accuracy",
    "precision@1", "precision@5", "precision@10", "precision@20",
    "recall@1", "recall@5", "recall@10", "recall@20",
    "mrr", "ndcg@10",
)  # fmt: skip
RANKING_KEYS = (*RANKING_METRICS, "n")
RECALL_KS = (1, 5, 10, 20)
BASELINES = ("popularity", "personal_frequency", "cooccurrence")
SCORERS = ("model", *BASELINES, "oracle")
AUX_HEADS = ("basket_size", "price_sensitivity", "mission_type", "mission_focus")
AUX_KEYS = ("accuracy", "macro_f1", "confusion", "labels", "n")
BUCKETS: dict[str, tuple[str, ...]] = {
    "cold_start": ("anonymous", "0", "1-2", "3-9", "10+"),
    "basket_length": ("2-4", "5-9", "10-19", "20-50"),
    "repeat_vs_explore": ("repeat", "explore"),
}
TOP_KEYS = ("schema", "meta", "model", "baselines", "oracle", "buckets", "promotion")
# Required meta keys and their types; other scalar keys (e.g. "mlflow_run_url") may be added.
META_TYPES: dict[str, tuple[type, ...]] = {
    "split": (str,),
    "model_name": (str,),
    "model_version": (str,),
    "model_uri": (str, type(None)),
    "mlflow_run_id": (str, type(None)),
    "cache_key": (str,),
    "n_baskets": (int,),
    "n_positions": (int,),
    "created": (str,),
    "eval_seed": (int,),
}
PROMOTION_KEYS = (
    "metric", "margin", "challenger_version", "challenger", "champion_version", "champion",
    "passed_baseline_check", "decision", "reason",
)  # fmt: skip
DECISIONS = ("champion", "challenger")

# Rows of the main ranking table (a readable subset of RANKING_METRICS; metrics.json holds them all).
TABLE_METRICS = ("accuracy", "recall@1", "recall@5", "recall@10", "recall@20", "precision@10", "mrr", "ndcg@10")
BUCKET_METRIC = "recall@10"
SCORER_NAMES = {
    "model": "model",
    "popularity": "popularity",
    "personal_frequency": "personal frequency",
    "cooccurrence": "co-occurrence",
    "oracle": "oracle",
}
BUCKET_TITLES = {
    "cold_start": "Cold start (customer's prior trips)",
    "basket_length": "Basket length (products in the basket)",
    "repeat_vs_explore": "Repeat vs explore (had the customer bought the masked product before?)",
}
AUX_TITLES = {
    "basket_size": "basket size",
    "price_sensitivity": "price sensitivity",
    "mission_type": "mission type",
    "mission_focus": "mission focus",
}

_BEST_NOTE = "(bold: best scorer other than the oracle)"

MARKDOWN = "report.md"
HTML = "report.html"
METRICS = "metrics.json"


# --------------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------------


def _fail(path: str, problem: str) -> None:
    raise ValueError(f"metrics document: {path}: {problem}")


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    # bool is an int subclass but never a metric; numpy integers are not JSON-serialisable.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_keys(obj: Any, path: str, expected: Sequence[str], *, what: str = "key", extra_ok: bool = False) -> None:
    if not isinstance(obj, Mapping):
        _fail(path, f"expected an object, got {_describe(obj)}")
    for key in obj:
        if not isinstance(key, str):
            _fail(path, f"{what} {key!r} is not a string")
    unknown = [k for k in obj if k not in expected]
    if unknown and not extra_ok:
        _fail(path, f"unknown {what} {unknown[0]!r} (expected {', '.join(expected)})")
    missing = [k for k in expected if k not in obj]
    if missing:
        _fail(path, f"missing {what} {missing[0]!r} (expected {', '.join(expected)})")


def _check_fraction(value: Any, path: str, *, nullable: bool) -> None:
    if value is None and nullable:
        return
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = ""
        if value is None:
            hint = " (null is allowed only where n is 0)"
        elif nullable and _is_number(value) and math.isnan(value):
            hint = " (NaN is not JSON: write null where n is 0; json_ready(doc) does that)"
        _fail(path, f"expected a number in [0, 1], got {_describe(value)}{hint}")


def _check_count(value: Any, path: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        hint = "; convert numpy integers with int()" if isinstance(value, np.integer) else ""
        _fail(path, f"expected a non-negative integer, got {_describe(value)}{hint}")


def _check_ranking(obj: Any, path: str, *, with_aux: bool = False) -> None:
    _check_keys(obj, path, (*RANKING_KEYS, "aux") if with_aux else RANKING_KEYS)
    _check_count(obj["n"], f"{path}.n")
    for metric in RANKING_METRICS:
        _check_fraction(obj[metric], f"{path}.{metric}", nullable=obj["n"] == 0)


def _check_aux(obj: Any, path: str) -> None:
    _check_keys(obj, path, AUX_HEADS, what="auxiliary head")
    for head in AUX_HEADS:
        p = f"{path}.{head}"
        entry = obj[head]
        _check_keys(entry, p, AUX_KEYS)
        _check_count(entry["n"], f"{p}.n")
        for metric in ("accuracy", "macro_f1"):
            _check_fraction(entry[metric], f"{p}.{metric}", nullable=entry["n"] == 0)
        labels = entry["labels"]
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            _fail(f"{p}.labels", f"expected a non-empty list of strings, got {_describe(labels)}")
        if len(set(labels)) != len(labels):
            _fail(f"{p}.labels", f"labels repeat: {labels!r}")
        confusion = entry["confusion"]
        k = len(labels)
        if not isinstance(confusion, list) or len(confusion) != k:
            _fail(f"{p}.confusion", f"expected a list of {k} rows (one per label), got {_describe(confusion)}")
        for i, row in enumerate(confusion):
            if not isinstance(row, list) or len(row) != k:
                _fail(f"{p}.confusion[{i}]", f"expected a list of {k} counts (one per label), got {_describe(row)}")
            for j, count in enumerate(row):
                _check_count(count, f"{p}.confusion[{i}][{j}]")


def json_ready(doc: Any) -> Any:
    """A copy of ``doc`` in which the NaN metrics of every empty object (``"n": 0``, e.g. a bucket no
    position fell into) are ``null``: NaN is not JSON, and the contract says "no value" with null.
    NaN anywhere else is kept, for :func:`validate_metrics` to reject."""
    if isinstance(doc, Mapping):
        empty = doc.get("n") == 0
        return {
            k: None if empty and isinstance(v, float) and math.isnan(v) else json_ready(v) for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [json_ready(v) for v in doc]
    return doc


def validate_metrics(doc: Any) -> None:
    """Raise ``ValueError`` naming the first key that breaks the ``metrics.json`` contract (schema
    :data:`SCHEMA`); return ``None`` when ``doc`` conforms.

    The contract: exactly :data:`TOP_KEYS` at the top; ``meta`` with :data:`META_TYPES` (``created``
    ISO-8601; further scalar keys allowed); ranking-metric objects with exactly :data:`RANKING_KEYS`
    (fractions in [0, 1], ``null`` only where ``n`` is 0), the ``model`` one also holding ``aux`` (the
    four :data:`AUX_HEADS`, each with :data:`AUX_KEYS`, ``confusion[actual][predicted]`` square over
    ``labels``); ``baselines`` exactly :data:`BASELINES`; ``oracle`` an object or ``null``; ``buckets``
    exactly :data:`BUCKETS`, every bucket holding every scorer of :data:`SCORERS` (``oracle`` ``null``
    exactly when the top-level ``oracle`` is); ``promotion`` exactly :data:`PROMOTION_KEYS`.
    Values are JSON types (lists, not tuples; Python ints, not numpy ones).
    """
    _check_keys(doc, "document", TOP_KEYS)
    if doc["schema"] != SCHEMA:
        _fail("schema", f"expected {SCHEMA!r}, got {_describe(doc['schema'])}")

    meta = doc["meta"]
    _check_keys(meta, "meta", tuple(META_TYPES), extra_ok=True)
    for key, types in META_TYPES.items():
        value = meta[key]
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            _fail(f"meta.{key}", f"expected {names}, got {_describe(value)}")
    for key in ("n_baskets", "n_positions"):
        _check_count(meta[key], f"meta.{key}")
    try:
        datetime.fromisoformat(meta["created"])
    except ValueError:
        _fail("meta.created", f"expected an ISO-8601 timestamp, got {meta['created']!r}")
    for key, value in meta.items():
        if key not in META_TYPES and not (value is None or isinstance(value, (str, int, float, bool))):
            _fail(f"meta.{key}", f"extra meta values must be scalars, got {_describe(value)}")

    _check_ranking(doc["model"], "model", with_aux=True)
    _check_aux(doc["model"]["aux"], "model.aux")
    _check_keys(doc["baselines"], "baselines", BASELINES, what="scorer")
    for name in BASELINES:
        _check_ranking(doc["baselines"][name], f"baselines.{name}")
    has_oracle = doc["oracle"] is not None
    if has_oracle:
        _check_ranking(doc["oracle"], "oracle")

    _check_keys(doc["buckets"], "buckets", tuple(BUCKETS), what="bucket group")
    for group, names in BUCKETS.items():
        _check_keys(doc["buckets"][group], f"buckets.{group}", names, what="bucket")
        for bucket in names:
            p = f"buckets.{group}.{bucket}"
            scorers = doc["buckets"][group][bucket]
            _check_keys(scorers, p, SCORERS, what="scorer")
            for scorer in SCORERS:
                if scorer == "oracle" and scorers[scorer] is None:
                    if has_oracle:
                        _fail(f"{p}.oracle", "is null but the top-level oracle is not")
                    continue
                if scorer == "oracle" and not has_oracle:
                    _fail(f"{p}.oracle", "must be null when the top-level oracle is null")
                _check_ranking(scorers[scorer], f"{p}.{scorer}")

    promo = doc["promotion"]
    _check_keys(promo, "promotion", PROMOTION_KEYS)
    if promo["metric"] not in RANKING_METRICS:
        _fail("promotion.metric", f"expected one of {', '.join(RANKING_METRICS)}, got {_describe(promo['metric'])}")
    if not _is_number(promo["margin"]) or not math.isfinite(promo["margin"]):
        _fail("promotion.margin", f"expected a finite number, got {_describe(promo['margin'])}")
    if not isinstance(promo["challenger_version"], str):
        _fail("promotion.challenger_version", f"expected str, got {_describe(promo['challenger_version'])}")
    _check_fraction(promo["challenger"], "promotion.challenger", nullable=False)
    if (promo["champion_version"] is None) != (promo["champion"] is None):
        _fail("promotion", "champion_version and champion must both be null (no champion yet) or both be set")
    if promo["champion_version"] is not None:
        if not isinstance(promo["champion_version"], str):
            _fail("promotion.champion_version", f"expected str or null, got {_describe(promo['champion_version'])}")
        _check_fraction(promo["champion"], "promotion.champion", nullable=False)
    if not isinstance(promo["passed_baseline_check"], bool):
        got = _describe(promo["passed_baseline_check"])
        _fail("promotion.passed_baseline_check", f"expected true or false, got {got}")
    if promo["decision"] not in DECISIONS:
        _fail("promotion.decision", f"expected one of {', '.join(DECISIONS)}, got {_describe(promo['decision'])}")
    if not isinstance(promo["reason"], str):
        _fail("promotion.reason", f"expected str, got {_describe(promo['reason'])}")


# --------------------------------------------------------------------------------------------------
# Tables shared by the three renderings
# --------------------------------------------------------------------------------------------------

Cell = str | int | float | None


@dataclass(frozen=True)
class _Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    bold: frozenset[tuple[int, int]] = frozenset()  # (row, column) cells to emphasise


@dataclass(frozen=True)
class _Section:
    key: str
    heading: str
    paragraphs: tuple[str, ...] = ()
    tables: tuple[_Table, ...] = ()
    figures: tuple[str, ...] = field(default=())  # plot ids the HTML places after the tables


def _fmt(value: Cell) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def gap_closed(model: float | None, popularity: float | None, oracle: float | None) -> float | None:
    """Share of the popularity→oracle gap the model closes: ``(model − popularity) / (oracle − popularity)``.

    1.0 means as good as the oracle, 0.0 no better than popularity, negative worse than popularity.
    ``None`` without an oracle (real data), when any value is missing, or when the oracle does not beat
    popularity (no gap to close).
    """
    if model is None or popularity is None or oracle is None or oracle <= popularity:
        return None
    return (model - popularity) / (oracle - popularity)


def _pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{round(100 * fraction)} %"


def _metric_label(metric: str) -> str:
    if metric in ("mrr",):
        return "MRR"
    if metric.startswith("ndcg"):
        return metric.replace("ndcg", "NDCG")
    return metric[0].upper() + metric[1:]


def _scorers(doc: Mapping) -> dict[str, Mapping]:
    """Top-level ranking metrics by scorer, in display order; the oracle only when present."""
    out = {"model": doc["model"], **{name: doc["baselines"][name] for name in BASELINES}}
    if doc["oracle"] is not None:
        out["oracle"] = doc["oracle"]
    return out


def _best_column(values: Sequence[float | None], names: Sequence[str]) -> int | None:
    """Index of the best non-oracle value (ties: the first), for emphasis."""
    candidates = [(v, i) for i, (v, n) in enumerate(zip(values, names)) if v is not None and n != "oracle"]
    if not candidates:
        return None
    best = max(v for v, _ in candidates)
    return next(i for v, i in candidates if v == best)


def headline(doc: Mapping) -> str:
    """One sentence: the promotion metric of the model against the best baseline and the oracle gap,
    e.g. ``Recall@10 0.213: beats co-occurrence 0.184 / closes 43 % of the popularity→oracle gap``."""
    metric = doc["promotion"]["metric"]
    model = doc["model"][metric]
    baselines = {name: doc["baselines"][name][metric] for name in BASELINES}
    known = {k: v for k, v in baselines.items() if v is not None}
    text = f"{_metric_label(metric)} {_num(model)}"
    if known:
        best_name = max(known, key=known.__getitem__)
        best = known[best_name]
        verb = "ties" if model == best else ("beats" if model is not None and model > best else "trails")
        text += f": {verb} {SCORER_NAMES[best_name]} {_num(best)}"
    oracle = doc["oracle"]
    gap = gap_closed(model, baselines["popularity"], None if oracle is None else oracle[metric])
    if gap is not None:
        text += f" / closes {_pct(gap)} of the popularity→oracle gap"
    return text


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _promotion_text(doc: Mapping) -> str:
    p = doc["promotion"]
    label = _metric_label(p["metric"])
    challenger = f"version {p['challenger_version']} scores {label} {p['challenger']:.4f}"
    if p["champion_version"] is None:
        against = "there is no champion yet"
    else:
        against = f"champion version {p['champion_version']} scores {p['champion']:.4f}"
    baseline = "passed" if p["passed_baseline_check"] else "failed"
    if p["decision"] == "champion":
        verdict = f"Version {p['challenger_version']} is promoted to champion."
    else:
        verdict = f"Version {p['challenger_version']} stays challenger."
    return (
        f"{verdict} On the {doc['meta']['split']} split {challenger}; {against} "
        f"(required margin {p['margin']:.4f}; baseline check {baseline}). Reason: {p['reason']}"
    )


def _ranking_table(doc: Mapping) -> _Table:
    scorers = _scorers(doc)
    names = list(scorers)
    rows, bold = [], set()
    for r, metric in enumerate(TABLE_METRICS):
        values = [scorers[s][metric] for s in names]
        best = _best_column(values, names)
        if best is not None:
            bold.add((r, best + 1))
        rows.append((metric, *values))
    rows.append(("n", *(scorers[s]["n"] for s in names)))
    columns = ("metric", *(SCORER_NAMES[s] for s in names))
    return _Table(f"Ranking metrics {_BEST_NOTE}", columns, tuple(rows), frozenset(bold))


def _bucket_table(doc: Mapping, group: str) -> _Table:
    has_oracle = doc["oracle"] is not None
    names = [s for s in SCORERS if s != "oracle" or has_oracle]
    columns = ["bucket", "n", *(SCORER_NAMES[s] for s in names)]
    if has_oracle:
        columns.append("gap closed")
    rows, bold = [], set()
    for r, bucket in enumerate(BUCKETS[group]):
        entry = doc["buckets"][group][bucket]
        values = [entry[s][BUCKET_METRIC] for s in names]
        best = _best_column(values, names)
        if best is not None:
            bold.add((r, best + 2))
        row: list[Cell] = [bucket, entry["model"]["n"], *values]
        if has_oracle:
            model, popularity, oracle = (entry[s][BUCKET_METRIC] for s in ("model", "popularity", "oracle"))
            row.append(_pct(gap_closed(model, popularity, oracle)))
        rows.append(tuple(row))
    return _Table(f"{BUCKET_METRIC} per bucket {_BEST_NOTE}", tuple(columns), tuple(rows), frozenset(bold))


def _aux_tables(doc: Mapping) -> list[_Table]:
    aux = doc["model"]["aux"]
    summary = _Table(
        "Auxiliary heads",
        ("head", "accuracy", "macro-F1", "n"),
        tuple((AUX_TITLES[h], aux[h]["accuracy"], aux[h]["macro_f1"], aux[h]["n"]) for h in AUX_HEADS),
    )
    tables = [summary]
    for head in AUX_HEADS:
        entry = aux[head]
        rows = tuple((label, *entry["confusion"][i]) for i, label in enumerate(entry["labels"]))
        diagonal = frozenset((i, i + 1) for i in range(len(entry["labels"])))
        columns = ("actual \\ predicted", *entry["labels"])
        tables.append(_Table(f"Confusion matrix: {AUX_TITLES[head]}", columns, rows, diagonal))
    return tables


def _meta_lines(doc: Mapping) -> tuple[str, ...]:
    meta = doc["meta"]
    return tuple(f"{key}: {'—' if value is None else value}" for key, value in meta.items())


def _sections(doc: Mapping) -> list[_Section]:
    return [
        _Section("meta", "Run", paragraphs=_meta_lines(doc)),
        _Section("ranking", "Model vs baselines", tables=(_ranking_table(doc),), figures=("recall_at_k",)),
        *(
            _Section(group, BUCKET_TITLES[group], tables=(_bucket_table(doc, group),))
            for group in BUCKETS
        ),
        _Section("buckets_plot", "Buckets at a glance", figures=("buckets",)),
        _Section("aux", "Auxiliary heads", tables=tuple(_aux_tables(doc)), figures=("confusion",)),
        _Section("promotion", "Promotion decision", paragraphs=(_promotion_text(doc),)),
    ]


def _title(doc: Mapping) -> str:
    meta = doc["meta"]
    return f"Evaluation of {meta['model_name']} version {meta['model_version']} ({meta['split']} split)"


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: _Table) -> str:
    lines = [f"**{_md_cell(table.title)}**", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(table.columns) - 1)) + "|")
    for r, row in enumerate(table.rows):
        cells = []
        for c, value in enumerate(row):
            text = _md_cell(_fmt(value))
            cells.append(f"**{text}**" if (r, c) in table.bold else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(doc: Mapping) -> str:
    """``report.md``: title, headline, every table of the report, and the promotion paragraph.
    Bold marks the best non-oracle scorer per row and the confusion matrices' diagonals."""
    parts = [f"# {_title(doc)}", f"**{headline(doc)}**"]
    for section in _sections(doc):
        if not section.paragraphs and not section.tables:
            continue  # figure-only sections exist in the HTML only
        parts.append(f"## {section.heading}")
        if section.key == "meta":
            parts.append("\n".join(f"- {line}" for line in section.paragraphs))
        else:
            parts.extend(section.paragraphs)
        parts.extend(_md_table(t) for t in section.tables)
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib Agg, PNG bytes)
# --------------------------------------------------------------------------------------------------

_COLORS = {
    "model": "#1f77b4",
    "popularity": "#7f7f7f",
    "personal_frequency": "#2ca02c",
    "cooccurrence": "#ff7f0e",
    "oracle": "#9467bd",
}


def plot_recall_at_k(doc: Mapping) -> bytes:
    """Recall@K against K (1, 5, 10, 20) for the model, the baselines and the oracle."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, metrics in _scorers(doc).items():
        points = [(k, metrics[f"recall@{k}"]) for k in RECALL_KS if metrics[f"recall@{k}"] is not None]
        ax.plot(
            [k for k, _ in points], [v for _, v in points], marker="o", label=SCORER_NAMES[name], color=_COLORS[name],
            linewidth=2.5 if name == "model" else 1.5, linestyle="--" if name == "oracle" else "-",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(RECALL_KS, [str(k) for k in RECALL_KS])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)


def plot_buckets(doc: Mapping) -> bytes:
    """Grouped bars of recall@10 per bucket and scorer, one panel per bucket group."""
    names = [s for s in SCORERS if s != "oracle" or doc["oracle"] is not None]
    groups = list(BUCKETS)
    fig = Figure(figsize=(5.5 * len(groups), 4), layout="constrained")
    width = 0.8 / len(names)
    for ax, group in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups):
        buckets = BUCKETS[group]
        x = np.arange(len(buckets))
        for i, name in enumerate(names):
            values = [doc["buckets"][group][b][name][BUCKET_METRIC] for b in buckets]
            ax.bar(
                x + (i - (len(names) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
                label=SCORER_NAMES[name], color=_COLORS[name],
            )  # fmt: skip
        ax.set_xticks(x, [f"{b}\n(n={doc['buckets'][group][b]['model']['n']:,})" for b in buckets], fontsize=8)
        ax.set_title(group.replace("_", " "))
        ax.set_ylabel(BUCKET_METRIC)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    return png_bytes(fig)


def plot_confusion(doc: Mapping) -> bytes:
    """Heatmaps of the four auxiliary heads' confusion matrices (rows actual, columns predicted),
    coloured by row share so imbalanced classes stay readable, annotated with counts."""
    aux = doc["model"]["aux"]
    fig = Figure(figsize=(10, 9), layout="constrained")
    for ax, head in zip(fig.subplots(2, 2).flat, AUX_HEADS):
        counts = np.asarray(aux[head]["confusion"], dtype=np.int64)
        labels = aux[head]["labels"]
        row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center", fontsize=8,
                        color="white" if row_share[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{AUX_TITLES[head]} (accuracy {_num(aux[head]['accuracy'])})")
    return png_bytes(fig)


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
p.headline { font-size: 1.15rem; font-weight: 600; background: #f3f6fa; padding: .6rem .8rem; border-radius: 4px; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .9rem; }
caption { text-align: left; font-weight: 600; padding-bottom: .3rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: 700; background: #eef7ee; }
ul.meta { font-family: ui-monospace, monospace; font-size: .85rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; }
figcaption { font-size: .85rem; color: #555; }
"""


def _html_table(table: _Table) -> str:
    e = html.escape
    out = ["<table>", f"<caption>{e(table.title)}</caption>", "<thead><tr>"]
    out.extend(f"<th>{e(c)}</th>" for c in table.columns)
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(table.rows):
        out.append("<tr>")
        for c, value in enumerate(row):
            classes = ["num"] if c > 0 else []
            if (r, c) in table.bold:
                classes.append("best")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            out.append(f"<td{attr}>{e(_fmt(value))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


_FIGURE_CAPTIONS = {
    "training": "Training curves",
    "recall_at_k": "Recall@K against K",
    "buckets": f"{BUCKET_METRIC} per bucket and scorer",
    "confusion": "Confusion matrices of the auxiliary heads (colour: share of the actual class)",
}


def render_html(doc: Mapping, history: Sequence[Mapping] | None = None) -> str:
    """``report.html``: a self-contained page (inline CSS, PNG plots as ``data:`` URIs, no scripts, no
    external URL) with the markdown report's tables plus training curves from ``history`` (rows like
    ``{"step": 100, "train/total": …, "val/loss": …}``; omitted when ``None`` or empty), Recall@K,
    per-bucket bars and confusion heatmaps. All text is HTML-escaped."""
    e = html.escape
    figures: dict[str, bytes] = {
        "recall_at_k": plot_recall_at_k(doc),
        "buckets": plot_buckets(doc),
        "confusion": plot_confusion(doc),
    }
    training = plot_training_curves(history or [])
    body = [f"<h1>{e(_title(doc))}</h1>", f'<p class="headline">{e(headline(doc))}</p>']
    for section in _sections(doc):
        body.append(f'<section id="{e(section.key)}"><h2>{e(section.heading)}</h2>')
        if section.key == "meta":
            body.append('<ul class="meta">' + "".join(f"<li>{e(line)}</li>" for line in section.paragraphs) + "</ul>")
        else:
            body.extend(f"<p>{e(p)}</p>" for p in section.paragraphs)
        body.extend(_html_table(t) for t in section.tables)
        body.extend(_html_figure(figures[f], _FIGURE_CAPTIONS[f]) for f in section.figures)
        body.append("</section>")
        if section.key == "meta" and training is not None:
            figure = _html_figure(training, _FIGURE_CAPTIONS["training"])
            body.append(f'<section id="training"><h2>Training</h2>{figure}</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(_title(doc))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target`` by renames (same parent, same file system).

    An existing ``target`` is renamed aside first and deleted after, so ``target`` is at every moment
    either the complete old folder, absent for the instant between two renames, or the complete new one.
    If the second rename fails, the old folder is put back.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _temp_sibling(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def write_report(
    doc: Mapping,
    out_dir: Path,
    *,
    history: Sequence[Mapping] | None = None,
    latest_dir: Path | None = None,
) -> dict[str, Path]:
    """Validate ``doc`` (after :func:`json_ready`: NaN metrics of empty buckets become null) and write
    ``report.md``, ``report.html`` and ``metrics.json`` (sorted keys, indent 2) as the folder
    ``out_dir``, replacing any previous one whole; then, if ``latest_dir`` is given, replace it the
    same way with a copy of ``out_dir``.

    Everything is rendered before anything touches the disk, written into a hidden temporary sibling
    folder, and renamed into place (see :func:`_replace_dir`); on failure the temporary folder is
    removed and the previous ``out_dir`` is left as it was. Returns the written files by name:
    ``{"report.md": …, "report.html": …, "metrics.json": …}`` (paths inside ``out_dir``).
    """
    doc = json_ready(doc)
    validate_metrics(doc)
    out_dir = Path(out_dir)
    texts = {
        MARKDOWN: render_markdown(doc),
        HTML: render_html(doc, history),
        METRICS: json.dumps(doc, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
    }
    _publish(out_dir, lambda folder: _write_texts(folder, texts))
    if latest_dir is not None:
        _publish(Path(latest_dir), lambda folder: _copy_files(out_dir, folder))
    return {name: out_dir / name for name in texts}


def _publish(target: Path, fill) -> None:
    """Run ``fill(folder)`` on a fresh temporary sibling of ``target``, then rename it into place."""
    tmp = _temp_sibling(target)
    try:
        fill(tmp)
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote evaluation report to %s", target)


def _write_texts(folder: Path, texts: Mapping[str, str]) -> None:
    for name, text in texts.items():
        _fsync_write(folder / name, text)


def _copy_files(source: Path, folder: Path) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copy2(path, folder / path.name)


# --------------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------------


# Short headers so the eight-column bucket table fits an 80-column terminal.
_SHORT_HEADERS = {
    "popularity": "pop.",
    "personal frequency": "personal",
    "co-occurrence": "co-occ.",
    "gap closed": "gap",
}


def _rich_table(table: _Table, *, title: str | None = None, short_headers: bool = False) -> Table:
    caption = None
    columns = list(table.columns)
    if short_headers:
        shortened = [c for c in columns if c in _SHORT_HEADERS]
        caption = ", ".join(f"{_SHORT_HEADERS[c]} = {c}" for c in shortened) or None
        columns = [_SHORT_HEADERS.get(c, c) for c in columns]
    out = Table(title=Text(title or table.title), caption=caption)
    for c, column in enumerate(columns):
        # Headers may wrap on a narrow terminal; values keep their full width (never "0.21…").
        width = max(len(_fmt(row[c])) for row in table.rows)
        out.add_column(column, justify="left" if c == 0 else "right", style="cyan" if c == 0 else None, min_width=width)
    for r, row in enumerate(table.rows):
        # Text, not markup strings: labels come from the document and may contain "[".
        out.add_row(*(Text(_fmt(v), style="bold green" if (r, c) in table.bold else "") for c, v in enumerate(row)))
    return out


def print_tables(doc: Mapping, console: Console | None = None) -> None:
    """Print the headline, model vs baselines vs oracle, recall@10 per cold-start bucket, and the
    promotion decision as rich tables (best non-oracle scorer per row in bold green)."""
    console = console or Console()
    meta = doc["meta"]
    console.print(Text(_title(doc), style="bold"))
    console.print(Text(headline(doc)))
    ranking_title = f"Model vs baselines ({meta['split']}, {meta['n_positions']:,} positions)"
    console.print(_rich_table(_ranking_table(doc), title=ranking_title))
    bucket_title = f"{BUCKET_TITLES['cold_start']}: {BUCKET_METRIC}"
    console.print(_rich_table(_bucket_table(doc, "cold_start"), title=bucket_title, short_headers=True))
    console.print(Text(_promotion_text(doc)))
