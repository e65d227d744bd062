"""Small helpers that turn frames and schemas into Dagster metadata (markdown previews, column schemas)."""

import dagster as dg
import polars as pl


def markdown_table(df: pl.DataFrame, max_rows: int = 5, max_chars: int = 60) -> str:
    """A markdown table of the first ``max_rows`` rows (lists and long strings shortened)."""
    head = df.head(max_rows)

    def cell(v: object) -> str:
        text = "∅" if v is None else (f"[{', '.join(map(str, v[:4]))}{', …' if len(v) > 4 else ''}]"
                                      if isinstance(v, list) else str(v))
        text = text.replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * head.width]
    for row in head.iter_rows():  # a preview of ≤ 5 rows, not the data path
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def column_schema(schema: pl.Schema | dict, descriptions: dict[str, str] | None = None) -> dg.TableSchema:
    descriptions = descriptions or {}
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=name, type=str(dtype), description=descriptions.get(name))
            for name, dtype in dict(schema).items()
        ]
    )


def counts_table(counts: dict[str, int], key: str = "value", value: str = "count") -> str:
    lines = [f"| {key} | {value} |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in counts.items()]
    return "\n".join(lines)
