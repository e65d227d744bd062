"""The report's tables, built once from a validated ``metrics.json`` document and rendered three ways
(markdown, HTML, terminal) by ``evaluation/report.py``, so the three always agree.

:func:`report_sections` lists what the report shows, in order; :func:`headline` and
:func:`promotion_text` are its sentences; the vocabulary of the renderings (scorer names, the metric
shown per bucket, section titles) lives here too.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from retailsim_pipeline.config import AUX_HEADS
from retailsim_pipeline.evaluation.schema import BASELINES, BUCKETS, GATE_METRIC, SCORER_NAMES, SCORERS

# Rows of the main ranking table (a readable subset of RANKING_METRICS; metrics.json holds them all).
TABLE_METRICS = ("accuracy", "recall@1", "recall@5", "recall@10", "recall@20", "precision@10", "mrr", "ndcg@10")
BUCKET_METRIC = "recall@10"
BUCKET_TITLES = {
    "cold_start": "Cold start (customer's prior trips)",
    "basket_length": "Basket length (products in the basket)",
    "repeat_vs_explore": "Repeat vs explore (had the customer bought the masked product before?)",
}
AUX_TITLES = {head: head.replace("_", " ") for head in AUX_HEADS}

_BEST_NOTE = "(bold: best scorer other than the oracle)"

Cell = str | int | float | None


@dataclass(frozen=True)
class Table:
    """One table of the report: the first column labels the rows, the others hold values."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    bold: frozenset[tuple[int, int]] = frozenset()  # (row, column) cells to emphasise


@dataclass(frozen=True)
class Section:
    """One part of the report: a heading, sentences, tables, and (HTML only) plots."""

    key: str
    heading: str
    paragraphs: tuple[str, ...] = ()
    tables: tuple[Table, ...] = ()
    figures: tuple[str, ...] = field(default=())  # plot ids the HTML places after the tables


def format_cell(value: Cell) -> str:
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


def scorer_metrics(doc: Mapping) -> dict[str, Mapping]:
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
    text = f"{_metric_label(metric)} {format_metric(model)}"
    if known:
        best_name = max(known, key=known.__getitem__)
        best = known[best_name]
        verb = "ties" if model == best else ("beats" if model is not None and model > best else "trails")
        text += f": {verb} {SCORER_NAMES[best_name]} {format_metric(best)}"
    oracle = doc["oracle"]
    gap = gap_closed(model, baselines["popularity"], None if oracle is None else oracle[metric])
    if gap is not None:
        text += f" / closes {_pct(gap)} of the popularity→oracle gap"
    return text


def format_metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def promotion_text(doc: Mapping) -> str:
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


def ranking_table(doc: Mapping) -> Table:
    scorers = scorer_metrics(doc)
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
    return Table(f"Ranking metrics {_BEST_NOTE}", columns, tuple(rows), frozenset(bold))


def bucket_table(doc: Mapping, group: str) -> Table:
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
    return Table(f"{BUCKET_METRIC} per bucket {_BEST_NOTE}", tuple(columns), tuple(rows), frozenset(bold))


def significance_table(doc: Mapping) -> Table:
    """model − each baseline on the gate metric with its paired-bootstrap interval; the strongest baseline
    (chosen on validation) marked, its row bold when the whole interval is above zero."""
    choice, significance = doc["baseline_choice"], doc["significance"]
    rows, bold = [], set()
    for r, name in enumerate(BASELINES):
        c = significance[name]
        strongest = name == choice["strongest"]
        label = SCORER_NAMES[name] + (" (strongest on validation)" if strongest else "")
        params = ", ".join(f"{k} {v:g}" for k, v in choice["params"].get(name, {}).items()) or "—"
        rows.append((label, choice["validation"][name], doc["baselines"][name][GATE_METRIC],
                     f"{c['difference']:+.4f}", f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
                     "yes" if c["significant"] else "no", params))
        if strongest and c["significant"]:
            bold.add((r, 3))
    first = significance[BASELINES[0]]
    columns = ("baseline", f"validation {GATE_METRIC}", f"test {GATE_METRIC}", "model − baseline",
               f"{first['confidence']:.0%} interval", "significant", "settings (chosen on validation)")
    return Table(f"The gate: model − baseline on {GATE_METRIC}, paired bootstrap over {first['n_baskets']:,} "
                 f"baskets ({first['n_resamples']:,} resamples)", columns, tuple(rows), frozenset(bold))


def _aux_tables(doc: Mapping) -> list[Table]:
    aux = doc["model"]["aux"]
    summary = Table(
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
        tables.append(Table(f"Confusion matrix: {AUX_TITLES[head]}", columns, rows, diagonal))
    return tables


def _meta_lines(doc: Mapping) -> tuple[str, ...]:
    meta = doc["meta"]
    return tuple(f"{key}: {'—' if value is None else value}" for key, value in meta.items())


def report_sections(doc: Mapping) -> list[Section]:
    return [
        Section("meta", "Run", paragraphs=_meta_lines(doc)),
        Section("ranking", "Model vs baselines", tables=(ranking_table(doc),), figures=("recall_at_k",)),
        Section("gate", "Against the strongest baseline", tables=(significance_table(doc),)),
        *(
            Section(group, BUCKET_TITLES[group], tables=(bucket_table(doc, group),))
            for group in BUCKETS
        ),
        Section("buckets_plot", "Buckets at a glance", figures=("buckets",)),
        Section("aux", "Auxiliary heads", tables=tuple(_aux_tables(doc)), figures=("confusion",)),
        Section("promotion", "Promotion decision", paragraphs=(promotion_text(doc),)),
    ]


def report_title(doc: Mapping) -> str:
    meta = doc["meta"]
    return f"Evaluation of {meta['model_name']} version {meta['model_version']} ({meta['split']} split)"
