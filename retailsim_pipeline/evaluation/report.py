"""The evaluation report's renderings of one validated ``metrics.json`` document, and its files.

- :func:`render_markdown` — ``report.md`` (headline, ranking table, bucket tables, auxiliary heads with
  confusion matrices, promotion decision);
- :func:`render_html` — ``report.html``, the same tables plus PNG plots (``evaluation/plots.py``)
  embedded as ``data:`` URIs. The page is self-contained: inline CSS, no scripts, no external URLs (a
  URL the caller put in ``meta`` is shown as escaped text, never as a link or a source);
- :func:`print_tables` — rich tables in the terminal;
- :func:`write_report` — the three files written into a versioned folder (and optionally a ``latest``
  copy), each folder replaced as a whole by renames so readers never see a half-written report.

The contract is ``evaluation/schema.py``; the tables the three renderings share are
``evaluation/report_tables.py``.
"""

import base64
import html
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text

from retailsim_pipeline.evaluation.plots import plot_buckets, plot_confusion, plot_recall_at_k
from retailsim_pipeline.evaluation.report_tables import (
    BUCKET_METRIC,
    BUCKET_TITLES,
    Table,
    bucket_table,
    format_cell,
    headline,
    promotion_text,
    ranking_table,
    report_sections,
    report_title,
    significance_table,
)
from retailsim_pipeline.evaluation.schema import json_ready, validate_metrics
from retailsim_pipeline.training.curves import plot_training_curves

log = logging.getLogger(__name__)

MARKDOWN = "report.md"
HTML = "report.html"
METRICS = "metrics.json"


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    lines = [f"**{_md_cell(table.title)}**", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(table.columns) - 1)) + "|")
    for r, row in enumerate(table.rows):
        cells = []
        for c, value in enumerate(row):
            text = _md_cell(format_cell(value))
            cells.append(f"**{text}**" if (r, c) in table.bold else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(doc: Mapping) -> str:
    """``report.md``: title, headline, every table of the report, and the promotion paragraph.
    Bold marks the best non-oracle scorer per row and the confusion matrices' diagonals."""
    parts = [f"# {report_title(doc)}", f"**{headline(doc)}**"]
    for section in report_sections(doc):
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


def _html_table(table: Table) -> str:
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
            out.append(f"<td{attr}>{e(format_cell(value))}</td>")
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
    body = [f"<h1>{e(report_title(doc))}</h1>", f'<p class="headline">{e(headline(doc))}</p>']
    for section in report_sections(doc):
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
        f"<title>{e(report_title(doc))}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
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


def _rich_table(table: Table, *, title: str | None = None, short_headers: bool = False) -> RichTable:
    caption = None
    columns = list(table.columns)
    if short_headers:
        shortened = [c for c in columns if c in _SHORT_HEADERS]
        caption = ", ".join(f"{_SHORT_HEADERS[c]} = {c}" for c in shortened) or None
        columns = [_SHORT_HEADERS.get(c, c) for c in columns]
    out = RichTable(title=Text(title or table.title), caption=caption)
    for c, column in enumerate(columns):
        # Headers may wrap on a narrow terminal; values keep their full width (never "0.21…").
        width = max(len(format_cell(row[c])) for row in table.rows)
        out.add_column(column, justify="left" if c == 0 else "right", style="cyan" if c == 0 else None, min_width=width)
    for r, row in enumerate(table.rows):
        # Text, not markup strings: labels come from the document and may contain "[".
        out.add_row(*(Text(format_cell(v), style="bold green" if (r, c) in table.bold else "") for c, v in enumerate(row)))
    return out


def print_tables(doc: Mapping, console: Console | None = None) -> None:
    """Print the headline, model vs baselines vs oracle, recall@10 per cold-start bucket, and the
    promotion decision as rich tables (best non-oracle scorer per row in bold green)."""
    console = console or Console()
    meta = doc["meta"]
    console.print(Text(report_title(doc), style="bold"))
    console.print(Text(headline(doc)))
    ranking_title = f"Model vs baselines ({meta['split']}, {meta['n_positions']:,} positions)"
    console.print(_rich_table(ranking_table(doc), title=ranking_title))
    bucket_title = f"{BUCKET_TITLES['cold_start']}: {BUCKET_METRIC}"
    console.print(_rich_table(bucket_table(doc, "cold_start"), title=bucket_title, short_headers=True))
    console.print(_rich_table(significance_table(doc)))
    console.print(Text(promotion_text(doc)))
