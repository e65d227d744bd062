"""Batched ingest (``ingest_weekly_files``): per file, exactly what ``ingest_weekly_file`` gives alone.

Every case starts from the weekly files of a freshly generated tiny dataset, plants problems in
several of them with plain text edits (as the other ingest tests do), ingests the folder both ways
and compares, file by file: the typed parquet and the quarantine frame for frame, the result's
counts, and, for a file refused as a whole, the error's type and message. A refused file never
holds up the others.
"""

import dataclasses
import gzip
import logging
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from retailsim_pipeline.config import IngestConfig, generator_preset
from retailsim_pipeline.prep.generator import generate
from retailsim_pipeline.prep.ingest import LgsrFormatError, LossyCopyError, ingest_weekly_file
from retailsim_pipeline.prep.ingest_batch import IngestOutcome, ingest_weekly_files, plan_batches
from retailsim_pipeline.prep.reading import read_header
from retailsim_pipeline.prep.schema import SEGMENT_CODE_ALIASES, week_of_file
from retailsim_pipeline_tests.prep.lgsr_text import (
    COL,
    field,
    no_tmp_files,
    read_lines,
    set_fields,
    write_lines,
)

#: documented code -> coded value of the published seg_1/seg_2 copy
TO_CODED = {c: {doc: coded for coded, doc in m.items()} for c, m in SEGMENT_CODE_ALIASES.items()}


@pytest.fixture(scope="module")
def generated_raw(tmp_path_factory) -> list[Path]:
    """The tiny dataset's weekly files, in week order (never modified by the tests)."""
    root = tmp_path_factory.mktemp("tiny_batch")
    generate(generator_preset("tiny"), root)
    files = sorted((root / "raw").glob("transactions_*.csv"))
    assert len(files) >= 12
    return files


@pytest.fixture
def raw(generated_raw, tmp_path) -> list[Path]:
    """A private copy of the weekly files, to plant problems in."""
    folder = tmp_path / "raw"
    folder.mkdir()
    return [Path(shutil.copy(f, folder / f.name)) for f in generated_raw]


def carded(lines: list[str]) -> list[int]:
    return [i for i in range(1, len(lines)) if field(lines[i], "CUST_CODE")]


def anonymous(lines: list[str]) -> list[int]:
    return [i for i in range(1, len(lines)) if not field(lines[i], "CUST_CODE")]


def edit(path: Path, fn) -> None:
    lines = read_lines(path)
    write_lines(path, fn(lines))


# ---- the problems, each a text edit of a file's lines --------------------------------------------


def row_problems(lines: list[str]) -> list[str]:
    """One of each strictly parsable row problem (the strict read takes them; the rules quarantine them)."""
    week = int(field(lines[1], "SHOP_WEEK"))
    edits = [
        {"QUANTITY": "0"}, {"SPEND": "-1.5"}, {"PROD_CODE": "PRDX"}, {"SHOP_DATE": "20060231"},
        {"SHOP_WEEK": str(week + 1)}, {"SPEND": "inf"}, {"QUANTITY": "20000"},
    ]
    for k, values in enumerate(edits):
        lines[5 + 4 * k] = set_fields(lines[5 + 4 * k], **values)
    lines[41] = set_fields(lines[41], SHOP_WEEKDAY=str(int(field(lines[41], "SHOP_WEEKDAY")) % 7 + 1))
    anon = next(i for i in anonymous(lines) if i > 50)
    lines[anon] = set_fields(lines[anon], CUST_LIFESTAGE="YA")  # a segment without a card
    card = next(i for i in carded(lines) if i > 70)
    lines[card] = set_fields(lines[card], CUST_LIFESTAGE="ZZ")  # an unknown segment code
    # a basket whose lines disagree on the store: every line of it is quarantined
    baskets: dict[str, list[int]] = {}
    for i in range(1, len(lines)):
        baskets.setdefault(field(lines[i], "BASKET_ID"), []).append(i)
    basket = next(ix for ix in baskets.values() if len(ix) >= 3 and ix[0] > 100)
    lines[basket[1]] = set_fields(lines[basket[1]], STORE_CODE="STORE09999")
    return lines


def published(lines: list[str]) -> list[str]:
    """The published layout: ``seg_1``/``seg_2`` header in lower case, coded values, quoted empties."""
    names = [{"CUST_PRICE_SENSITIVITY": "seg_1", "CUST_LIFESTAGE": "seg_2"}.get(c, c.lower())
             for c in lines[0].split(",")]
    out = [",".join(names)]
    for line in lines[1:]:
        fields = line.split(",")
        for c in ("CUST_PRICE_SENSITIVITY", "CUST_LIFESTAGE"):
            v = fields[COL[c]]
            fields[COL[c]] = TO_CODED[c].get(v, v) if v else '""'
        if not fields[COL["CUST_CODE"]]:
            fields[COL["CUST_CODE"]] = '""'
        out.append(",".join(fields))
    return out


def coded_with_problems(lines: list[str]) -> list[str]:
    """The published layout with a zero quantity and one id in scientific notation (too few to be lossy)."""
    lines = published(lines)
    lines[7] = set_fields(lines[7], QUANTITY="0")
    lines[11] = set_fields(lines[11], PROD_CODE="1.2E+5")
    return lines


def unparsable(lines: list[str]) -> list[str]:
    lines[len(lines) // 2] = set_fields(lines[len(lines) // 2], QUANTITY="abc")
    return lines


def short_line(lines: list[str]) -> list[str]:
    i = len(lines) // 3
    lines[i] = ",".join(lines[i].split(",")[:-1])
    return lines


def all_quarantined(lines: list[str]) -> list[str]:
    return [lines[0]] + [set_fields(line, QUANTITY="0") for line in lines[1:]]


def header_only(lines: list[str]) -> list[str]:
    return lines[:1]


def rounded_ids(lines: list[str]) -> list[str]:
    return [lines[0]] + [set_fields(line, BASKET_ID=str(int(float(f"{int(field(line, 'BASKET_ID')):.3E}"))))
                         for line in lines[1:]]


def mixed_families(lines: list[str]) -> list[str]:
    lines = published(lines)
    i = carded(lines)[5]
    lines[i] = set_fields(lines[i], CUST_PRICE_SENSITIVITY="LA")
    return lines


def not_lgsr(lines: list[str]) -> list[str]:
    return ["id,name,amount", "1,a,2.0", "2,b,3.5"]


def another_week(lines: list[str]) -> list[str]:
    return [lines[0]] + [set_fields(line, SHOP_WEEK="200650") for line in lines[1:]]


#: file index in week order → (problem, how the file goes: "batch" or why it is ingested alone)
PLANTED = {
    1: (row_problems, "batch"),
    2: (coded_with_problems, "an id in scientific notation"),
    3: (unparsable, "the strict read failed"),
    4: (short_line, "its last column has empty fields (maybe a short line)"),
    5: (all_quarantined, "batch"),
    6: (header_only, "no data line"),
    7: (rounded_ids, "its BASKET_IDs look rounded"),
    8: (mixed_families, "it mixes segment code families"),
    9: (not_lgsr, None),  # refused before the batch is read
    11: (another_week, "most rows hold another week"),
}


def reuse_basket_id(lines: list[str], basket_id: str) -> list[str]:
    """Give one (untouched) basket of the file another week's BASKET_ID: sound, as ids are unique per week."""
    assert basket_id not in {field(line, "BASKET_ID") for line in lines[1:]}
    old = field(lines[-1], "BASKET_ID")
    return [lines[0]] + [set_fields(line, BASKET_ID=basket_id) if field(line, "BASKET_ID") == old else line
                         for line in lines[1:]]


def plant(raw: list[Path]) -> list[Path]:
    """Plant every problem of :data:`PLANTED`; file 1 also reuses a BASKET_ID of file 0 (another store
    and date, in another week: no conflict); file 10 is gzip-compressed (``.csv.gz``) with a published
    layout and a negative quantity. Returns the files, in week order."""
    for k, (problem, _) in PLANTED.items():
        edit(raw[k], problem)
    edit(raw[1], lambda lines: reuse_basket_id(lines, field(read_lines(raw[0])[1], "BASKET_ID")))
    edit(raw[10], lambda lines: published(lines[:1] + [set_fields(lines[1], QUANTITY="-3")] + lines[2:]))
    gz = raw[10].with_name(raw[10].name + ".gz")
    with open(raw[10], "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw[10].unlink()
    raw[10] = gz
    return raw


# ---- the comparison ------------------------------------------------------------------------------------


def ingest_alone(path: Path, root: Path, limits: IngestConfig | None):
    try:
        return ingest_weekly_file(path, root / "out", root / "quarantine", limits)
    except (LgsrFormatError, OSError) as exc:
        return exc


def assert_same_as_alone(files: list[Path], root: Path, limits: IngestConfig | None = None) -> list[IngestOutcome]:
    """Ingest ``files`` batched (under ``root/batch``) and one by one (``root/alone``); assert that
    each file's outputs, result and error are the same. Returns the batch's outcomes."""
    batch = list(ingest_weekly_files(files, root / "batch" / "out", root / "batch" / "quarantine", limits))
    assert [o.source for o in batch] == files
    for path, outcome in zip(files, batch):
        alone = ingest_alone(path, root / "alone", limits)
        if isinstance(alone, Exception):
            assert outcome.result is None and type(outcome.error) is type(alone), (path, outcome, alone)
            assert str(outcome.error) == str(alone)
            continue
        assert outcome.error is None, (path, outcome.error)
        got = outcome.result
        assert dataclasses.replace(got, output=alone.output, quarantine=alone.quarantine) == alone
        assert (got.output.name, got.quarantine.name) == (alone.output.name, alone.quarantine.name)
        assert_frame_equal(pl.read_parquet(got.output), pl.read_parquet(alone.output))
        assert_frame_equal(pl.read_parquet(got.quarantine), pl.read_parquet(alone.quarantine))
    # a refused file wrote nothing, the same outputs exist both ways, no temporary file is left
    assert sorted(p.name for p in (root / "batch" / "out").iterdir()) == sorted(
        p.name for p in (root / "alone" / "out").iterdir())
    assert no_tmp_files(root / "batch" / "out", root / "batch" / "quarantine") == []
    return batch


@pytest.mark.parametrize("batch_mb", [64.0, 0.45], ids=["one_batch", "batches_of_two_or_three"])
def test_planted_problems_give_per_file_outputs_results_and_errors(raw, tmp_path, caplog, batch_mb):
    files = plant(raw)
    limits = IngestConfig(batch_mb=batch_mb)
    if batch_mb < 1:  # the small limit really splits the folder into several batches
        assert sum(isinstance(b, tuple) for b in plan_batches(files, int(batch_mb * 2**20))) >= 3
    with caplog.at_level(logging.INFO, logger="retailsim_pipeline.prep.ingest_batch"):
        batch = assert_same_as_alone(files, tmp_path, limits)

    by_name = {o.source.name: o for o in batch}
    # the planted problems did what they were planted for (so the comparison above means something)
    assert isinstance(by_name[files[7].name].error, LossyCopyError)
    assert "mix two code families" in str(by_name[files[8].name].error)
    assert "not an LGSR transaction file" in str(by_name[files[9].name].error)
    assert "rename the file after its week" in str(by_name[files[11].name].error)
    rows_bad = by_name[files[1].name].result
    assert rows_bad.quarantined >= 12 and rows_bad.reasons["BASKET_ID appears with different STORE_CODE values"] >= 3
    assert any(r.startswith("SHOP_WEEK differs from the file's week") for r in rows_bad.reasons)
    assert "unknown code in CUST_LIFESTAGE" in rows_bad.reasons
    assert by_name[files[2].name].result.segment_codes == "coded"
    assert by_name[files[10].name].result.segment_codes == "coded" and by_name[files[10].name].result.quarantined == 1
    assert by_name[files[0].name].result.segment_codes == "documented"
    assert by_name[files[5].name].result.rows == 0
    assert by_name[files[6].name].result.lines == 0
    # which files left the batch, and why (when the whole folder fits one batch)
    alone = dict(m.groups() for r in caplog.records
                 if (m := re.fullmatch(r"(.*?): ingested on its own \((.*)\)", r.getMessage())))
    if batch_mb >= 1:
        want = {files[k].name: why for k, (_, why) in PLANTED.items() if why not in ("batch", None)}
        assert alone == want


def test_clean_weeks_in_one_batch_give_per_file_outputs(generated_raw, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="retailsim_pipeline.prep.ingest_batch"):
        batch = assert_same_as_alone(generated_raw, tmp_path)
    assert not [r for r in caplog.records if "ingested on its own" in r.getMessage()]
    assert all(o.result.quarantined == 0 and o.result.rows > 0 for o in batch)
    assert [o.result.week for o in batch] == [week_of_file(f.name) for f in generated_raw]


def test_a_week_whose_outputs_cannot_be_written_fails_alone(generated_raw, tmp_path):
    out, qdir = tmp_path / "out", tmp_path / "quarantine"
    blocked = out / (generated_raw[2].name.removesuffix(".csv") + ".parquet")
    blocked.mkdir(parents=True)  # the final rename cannot succeed
    (blocked / "keep").write_text("x")

    outcomes = list(ingest_weekly_files(generated_raw, out, qdir))

    assert isinstance(outcomes[2].error, OSError) and outcomes[2].result is None
    assert all(o.error is None for k, o in enumerate(outcomes) if k != 2)
    assert (blocked / "keep").read_text() == "x"
    assert len(list(out.glob("*.parquet"))) == len(generated_raw)  # the others, and the blocked folder
    assert no_tmp_files(out, qdir) == []


def test_plan_batches_keeps_order_and_bounds_each_batch(generated_raw, tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    # eight files of one size (the plan reads headers and sizes only)
    files = [Path(shutil.copy(generated_raw[0], folder / f.name)) for f in generated_raw[:8]]
    size = files[0].stat().st_size
    # file 3 compressed: it counts uncompressed; file 5 with its columns in another order: another header
    with open(files[3], "rb") as src, gzip.open(files[3].with_name(files[3].name + ".gz"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    files[3].unlink()
    files[3] = files[3].with_name(files[3].name + ".gz")
    lines = read_lines(files[5])
    write_lines(files[5], [",".join(reversed(line.split(","))) for line in lines])
    write_lines(files[6], ["not,a,header", "1,2,3"])

    plan = plan_batches(files, int(2.5 * size))

    flat = [p for step in plan for p in (step[0] if isinstance(step, tuple) else [step])]
    assert flat == files  # every file once, in order
    batches = [step[0] for step in plan if isinstance(step, tuple)]
    assert batches == [files[0:2], files[2:4]]  # two of ~size fit in 2.5 x size, the gzip one at its CSV size
    assert files[4] in plan and files[5] in plan and files[6] in plan and files[7] in plan  # alone
    assert [step[1] for step in plan if isinstance(step, tuple)] == [read_header(files[0])] * 2
    # one file larger than a batch goes alone; a one-file run too
    assert plan_batches(files[:2], size // 2) == files[:2]


def test_a_card_field_last_quoted_or_empty(generated_raw, tmp_path, caplog):
    """A quoted empty card field in the last column is a value (strict read, in the batch); an unquoted
    empty one may be a short line (the file leaves the batch for the tolerant read), as alone."""
    folder = tmp_path / "raw"
    folder.mkdir()
    files = [Path(shutil.copy(f, folder / f.name)) for f in generated_raw[:3]]
    order = [c for c in read_lines(files[0])[0].split(",") if c != "CUST_LIFESTAGE"] + ["CUST_LIFESTAGE"]

    def lifestage_last(lines: list[str]) -> list[str]:
        names = [n.upper().replace("SEG_1", "CUST_PRICE_SENSITIVITY").replace("SEG_2", "CUST_LIFESTAGE")
                 for n in lines[0].split(",")]
        at = [names.index(c) for c in order]
        return [",".join(line.split(",")[k] for k in at) for line in lines]

    edit(files[0], lambda lines: lifestage_last(published(lines)))
    edit(files[1], lambda lines: lifestage_last(published(lines)))
    edit(files[2], lifestage_last)  # documented, anonymous shoppers' fields left empty
    assert any(line.endswith(',""') for line in read_lines(files[0]))
    assert any(line.endswith(",") for line in read_lines(files[2]))
    with caplog.at_level(logging.INFO, logger="retailsim_pipeline.prep.ingest_batch"):
        assert_same_as_alone(files, tmp_path)
    alone = [r.getMessage() for r in caplog.records if "ingested on its own" in r.getMessage()]
    assert alone == [f"{files[2].name}: ingested on its own (its last column has empty fields (maybe a short line))"]
