"""The report's plots as PNG bytes (matplotlib's object API, ``Figure`` + Agg, never ``pyplot``'s
global state): Recall@K against K, recall@10 per bucket, the auxiliary heads' confusion matrices. The
training curves are ``training/curves.py``'s."""

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from retailsim_pipeline.config import AUX_HEADS
from retailsim_pipeline.evaluation.report_tables import AUX_TITLES, BUCKET_METRIC, format_metric, scorer_metrics
from retailsim_pipeline.evaluation.schema import BUCKETS, RECALL_KS, SCORER_NAMES, SCORERS
from retailsim_pipeline.training.curves import png_bytes

_COLORS = {
    "model": "#1f77b4",
    "popularity": "#7f7f7f",
    "personal_frequency": "#2ca02c",
    "cooccurrence": "#ff7f0e",
    "blend": "#d62728",
    "tifu_knn": "#8c564b",
    "oracle": "#9467bd",
}


def plot_recall_at_k(doc: Mapping) -> bytes:
    """Recall@K against K (1, 5, 10, 20) for the model, the baselines and the oracle."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, metrics in scorer_metrics(doc).items():
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
        ax.set_title(f"{AUX_TITLES[head]} (accuracy {format_metric(aux[head]['accuracy'])})")
    return png_bytes(fig)
