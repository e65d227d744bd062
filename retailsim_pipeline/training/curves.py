"""The training curves as one PNG, drawn once: the training run logs it to MLflow, the HTML report embeds it.

``history`` is the trainer's list of logged rows, e.g. ``{"step": 100, "train/loss": 2.1, "train/focal": 1.7}``
and ``{"step": 100, "val/loss": 2.3}``; a key may be missing from any row, and non-finite or non-numeric values
are left out (a gap, not a crash). matplotlib's object API (``Figure`` + Agg), never ``pyplot``'s global state.
"""

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["plot_training_curves", "png_bytes", "write_training_curves"]


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, without matplotlib's "Software" text chunk (no URL inside a report's image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _series(history: Sequence[Mapping]) -> dict[str, tuple[list[float], list[float]]]:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(history):
        step = row.get("step", i)
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    return series


def plot_training_curves(history: Sequence[Mapping]) -> bytes | None:
    """Every numeric history key against ``step``, one panel per prefix (``train/…``, ``val/…``, …);
    learning rates get their own panel. ``None`` when there is nothing to plot."""
    series = _series(history or [])
    if not series:
        return None
    panels: dict[str, list[str]] = {}
    for key in series:
        prefix, _, name = key.rpartition("/")
        panel = "learning rate" if "lr" in name.split("_") else prefix or "other"
        panels.setdefault(panel, []).append(key)
    fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    for ax, (panel, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for key in keys:
            xs, ys = series[key]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png_bytes(fig)


def write_training_curves(history: Sequence[Mapping], path: str | Path) -> Path | None:
    """:func:`plot_training_curves` written to ``path`` (temporary file + rename); ``None`` and nothing
    written when the history holds nothing to plot."""
    png = plot_training_curves(history)
    if png is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)
    return path
