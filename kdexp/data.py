"""GLUE data: from the Hub (`nyu-mll/glue`) or a local folder in the classic TSV layout.

Splits are sliced (`max_train_samples`, `max_eval_samples`: the first N rows, as in
`run_glue.py`), tokenised once and cached on disk under a key of (tokenizer, max length,
task, split, content), then padded per batch by `pad_batch`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import numbers
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from kdexp import families
from kdexp.cache import atomic_directory, cache_key, wait_for_rank_zero
from kdexp.errors import DataError
from kdexp.hardware import is_global_zero
from kdexp.tasks import CLASSIFICATION, EXTRACTIVE_QA, MULTIPLE_CHOICE, GlueTask, TsvLayout

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# The classic GLUE files contain unmatched quote marks: read them with quoting off.
csv.field_size_limit(1 << 24)


# A small real SST-2 slice shipped in the package (kdexp/resources/glue/README.md): the data of a fresh
# machine with no GLUE folder and no Hub.
EMBEDDED_GLUE_DIR = Path(__file__).resolve().parent / "resources" / "glue"
EMBEDDED_TASKS = ("sst2",)


@dataclass(frozen=True)
class DataSource:
    """Where a task's data comes from: a local GLUE folder, or the Hub dataset `hub_dataset` when `glue_dir`
    is None (a Hub id, or a local folder in that dataset's layout: kdexp.hub_folder).

    `embedded_fallback` (data.source=auto with no GLUE folder): a task the Hub cannot give, and that the
    package ships a slice of (SST-2), is read from that slice, and the log says so.
    """

    glue_dir: Path | None
    hub_dataset: str = HUB_DATASET
    embedded_fallback: bool = False
    mrc_dir: Path | None = None  # machine reading comprehension: the official releases (dream/, race/, squad*/)

    @classmethod
    def from_config(
        cls, source: str, glue_dir: str | None, hub_dataset: str | None = None, mrc_dir: str | None = None
    ) -> "DataSource":
        glue_dir = glue_dir or os.environ.get("GLUE_DIR") or None
        hub_dataset = hub_dataset or HUB_DATASET
        mrc = mrc_dir or os.environ.get("MRC_DIR") or None
        mrc_path = Path(mrc).expanduser().resolve() if mrc and source != "hub" else None
        if mrc_path is not None and not mrc_path.is_dir():
            raise DataError(f"MRC folder '{mrc}' (data.mrc_dir / MRC_DIR) does not exist.")
        if source == "hub":
            return cls(None, hub_dataset)
        if source not in ("auto", "local"):
            raise ValueError(f"data.source must be one of auto, hub, local; got '{source}'.")
        if glue_dir is None:
            if source == "local":
                raise DataError(
                    "data.source=local needs a GLUE folder: set data.glue_dir=<path> or the "
                    "GLUE_DIR environment variable (e.g. GLUE_DIR=../shared/glue_data)."
                )
            return cls(None, hub_dataset, embedded_fallback=True, mrc_dir=mrc_path)
        path = Path(glue_dir).expanduser().resolve()
        if not path.is_dir():
            raise DataError(f"GLUE folder '{glue_dir}' (data.glue_dir / GLUE_DIR) does not exist.")
        return cls(path, hub_dataset, mrc_dir=mrc_path)

    @classmethod
    def from_data_config(cls, data: Any) -> "DataSource":
        """The source of a run's `data` group (`source`, `glue_dir`, `hub_dataset`, `mrc_dir`)."""
        return cls.from_config(data.source, data.glue_dir, data.get("hub_dataset"), data.get("mrc_dir"))

    @property
    def description(self) -> str:
        return f"local:{self.glue_dir}" if self.glue_dir else f"hub:{self.hub_dataset}"


# --------------------------------------------------------------------------- reading


# How Python, JSON and pandas write a missing value: never a class unless task.labels lists it.
MISSING_LABELS = ("None", "null", "NULL", "NaN", "nan")


def _label_to_id(task: GlueTask, raw: str, path: Path, line_no: int) -> float | int:
    raw = raw.strip()
    if not raw:
        raise DataError(f"{path}:{line_no}: the label is empty; give every row a label, or drop the row.")
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(
                f"{path}:{line_no}: label '{raw}' is not a number (task {task.name} is regression)."
            ) from None
        if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite: no training target
            raise DataError(
                f"{path}:{line_no}: label '{raw}' is not a finite number; give every row a score, or drop the row."
            )
        return value
    values = task.local_label_values or tuple(str(i) for i in range(task.num_labels))
    if raw not in values and raw.isdigit() and int(raw) < task.num_labels:
        return int(raw)  # a label id where the file usually holds words (or the other way round)
    if raw not in values and raw in MISSING_LABELS:
        raise DataError(_missing_label_message(path, line_no, raw))
    if raw not in values:
        raise DataError(
            f"{path}:{line_no}: label '{raw}' is not in the label set of task {task.name} ({', '.join(values)})."
        )
    return values.index(raw)


def _missing_label_message(path: Path, line_no: int, raw: str) -> str:
    return (
        f"{path}:{line_no}: the label is '{raw}', a missing value; give every row a label, or drop the row "
        f"(or list '{raw}' in task.labels if it is a class)."
    )


def _column_index(header: list[str] | None, column: str | int, path: Path) -> int:
    if isinstance(column, int):
        return column
    assert header is not None
    if column not in header:
        raise DataError(f"{path}: expected a column named '{column}' in the header, found {header}.")
    return header.index(column)


def read_utf8_text(path: Path) -> str:
    """The file's text (without a byte-order mark); a `DataError` names the line of the first bad byte."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise DataError(
            f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {column} of the line, "
            f"perhaps Latin-1 or Windows-1252); save the file as UTF-8."
        ) from None


def _layout_description(layout: TsvLayout, task: GlueTask) -> str:
    """What the file should hold, e.g. `a header line with the columns sentence, label and tab-separated rows`."""
    columns = list(zip(task.text_fields, layout.text_columns))
    if layout.label_column is not None:
        columns.append(("label", layout.label_column))
    if layout.has_header:
        return f"a header line with the columns {', '.join(str(c) for _, c in columns)} and tab-separated rows"
    placed = ", ".join(f"{field} in column {c + 1 if isinstance(c, int) else c}" for field, c in columns)
    return f"tab-separated rows without a header ({placed})"


def read_glue_tsv(path: Path, layout: TsvLayout, task: GlueTask) -> dict[str, list[Any]]:
    """Read one classic GLUE TSV file into columns named like the Hub dataset.

    Raises `DataError` naming the file (and line) for text that is not UTF-8, an empty file,
    a header without rows, short rows or labels outside the task's set.
    """
    text = read_utf8_text(path)
    if not text.strip():
        raise DataError(f"{path}: is empty; expected {_layout_description(layout, task)}.")
    columns: dict[str, list[Any]] = {name: [] for name in task.text_fields}
    has_labels = layout.label_column is not None
    if has_labels:
        columns["label"] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader) if layout.has_header else None
    text_idx = [_column_index(header, c, path) for c in layout.text_columns]
    label_idx = _column_index(header, layout.label_column, path) if layout.label_column is not None else None
    needed = max(text_idx + ([label_idx] if label_idx is not None else [])) + 1
    first_line = 2 if layout.has_header else 1
    for line_no, row in enumerate(reader, start=first_line):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < needed:
            raise DataError(
                f"{path}:{line_no}: malformed row with {len(row)} tab-separated fields, "
                f"expected at least {needed} ({', '.join(map(str, layout.text_columns))}"
                f"{', label' if has_labels else ''})."
            )
        for name, i in zip(task.text_fields, text_idx):
            columns[name].append(row[i])
        if label_idx is not None:
            columns["label"].append(_label_to_id(task, row[label_idx], path, line_no))
    if header is not None and not columns[task.text_fields[0]]:
        raise DataError(f"{path}: has a header but no rows; expected {_layout_description(layout, task)}.")
    return columns


def _local_layout(task: GlueTask, split: str) -> TsvLayout:
    layout = task.local_layouts.get(split)
    if layout is None:
        raise DataError(f"Task {task.name} has no '{split}' split in the local GLUE layout.")
    return layout


def _local_split(task: GlueTask, split: str, glue_dir: Path) -> datasets.Dataset:
    layout = _local_layout(task, split)
    path = glue_dir / task.local_dir / layout.file
    if not path.is_file():
        raise DataError(
            f"GLUE folder '{glue_dir}' has no {task.local_dir}/{layout.file} for task {task.name}. "
            f"Point data.glue_dir (or GLUE_DIR) at a folder with the classic layout "
            f"(<TASK>/train.tsv, dev.tsv), or use data.source=hub."
        )
    columns = read_glue_tsv(path, layout, task)
    return datasets.Dataset.from_dict(columns)


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV (header, standard quoting), TSV (header, no quoting, as GLUE) or JSONL file.

    Raises `DataError` naming the file (and line) for an unknown suffix, bad UTF-8, bad JSON, a
    JSON line that is not an object, or a row whose number of fields differs from the header's.
    """
    return [row for _, row in read_table_lines(path)]


def read_table_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """`read_table`'s rows, each with the line of the file it starts on (for errors that name it)."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{path}: unknown table format; use a .csv, .tsv or .jsonl file with a header / one JSON object per line."
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; save the file as UTF-8.") from None
    if path.suffix in (".jsonl", ".json"):
        return _json_lines(text, path)
    return _delimited_rows(text, path)


def _json_lines(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not a JSON object ({err.msg}).") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{number}: not a JSON object (a {type(row).__name__}); write one object per "
                'line, e.g. {"text": "...", "label": "..."}.'
            )
        rows.append((number, row))
    return rows


def _delimited_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    tsv = path.suffix == ".tsv"
    reader = csv.reader(
        io.StringIO(text), delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    )
    header = next(reader, None)
    if not header:
        raise DataError(f"{path}: is empty; expected a header line naming the columns.")
    rows = []
    start = reader.line_num + 1
    for values in reader:
        number, start = start, reader.line_num + 1  # a quoted cell may span lines: a row starts after the last
        if not values:
            continue
        if len(values) != len(header):
            raise DataError(f"{path}:{number}: {len(values)} fields, the header has {len(header)}.")
        rows.append((number, dict(zip(header, values))))
    return rows


def file_split(task: GlueTask, split: str) -> datasets.Dataset:
    """A split of the user's own files (task=custom): the text columns and the label as an id (or a float).

    Every row needs a label (a missing, empty or null one is refused with file:line) and a text in
    each text column; with `task.allow_empty_text` an empty text is kept and counted in one log line.
    """
    path = Path(task.files[split])
    rows = read_table_lines(path)
    if not rows:
        raise DataError(f"{path}: has no rows.")
    _check_columns(path, rows, [*task.text_fields, task.label_column])
    allow_empty = task.allow_empty_text
    columns: dict[str, list[Any]] = {name: [] for name in task.text_fields}
    labels: list[float | int] = []
    empty_rows = 0
    for line, row in rows:
        texts = {name: _text_cell(row, name, path, line, allow_empty) for name in task.text_fields}
        empty_rows += any(not text.strip() for text in texts.values())
        for name, text in texts.items():
            columns[name].append(text)
        labels.append(_label_to_id(task, _label_cell(row, task.label_column, path, line), path, line))
    columns["label"] = labels
    if empty_rows:
        _log_empty_texts(path, empty_rows)
    return datasets.Dataset.from_dict(columns)


def _check_columns(path: Path, rows: list[tuple[int, dict[str, Any]]], needed: list[str]) -> None:
    """Refuse a column that no row has: the config names another column than the file."""
    present = set().union(*(row for _, row in rows))
    missing = [c for c in needed if c not in present]
    if missing:
        line, row = rows[0]
        raise DataError(
            f"{path}:{line}: no column {missing} (columns: {list(row)}); set "
            "task.text_columns / task.label_column to the file's names."
        )


def _label_cell(row: dict[str, Any], column: str, path: Path, line: int) -> str:
    """The row's label as written; a missing key, JSON null or empty cell is refused with file:line."""
    if column not in row:
        raise DataError(
            f"{path}:{line}: the row has no '{column}' (its label); give every row a label, or drop the row."
        )
    value = row[column]
    if value is None:
        raise DataError(f"{path}:{line}: the label ('{column}') is null; give every row a label, or drop the row.")
    raw = str(value).strip()
    if not raw:
        raise DataError(f"{path}:{line}: the label ('{column}') is empty; give every row a label, or drop the row.")
    return raw


def _text_cell(row: dict[str, Any], column: str, path: Path, line: int, allow_empty: bool) -> str:
    """The row's text in `column` (JSON null or a missing key read as empty); empty is refused unless allowed."""
    value = row.get(column)
    text = "" if value is None else str(value)
    if not text.strip() and not allow_empty:
        raise DataError(
            f"{path}:{line}: the text in column '{column}' is empty; fill it in or drop the row, or set "
            "task.allow_empty_text=true to keep such rows."
        )
    return text


_EMPTY_TEXTS_LOGGED: set[tuple[str, int]] = set()  # (file, count): said once per process, not per load


def _log_empty_texts(path: Path, count: int) -> None:
    if (str(path), count) not in _EMPTY_TEXTS_LOGGED:
        _EMPTY_TEXTS_LOGGED.add((str(path), count))
        log.info("%s: %d row(s) with an empty text kept (task.allow_empty_text=true).", path, count)


def labels_in(path: str | Path, column: str) -> tuple[str, ...]:
    """A custom task's classes: the distinct labels of the training file, sorted (numbers numerically).

    Every row needs a label: a missing, empty or null one, or one written as a missing value
    ('None', 'NaN'), is refused with file:line, so the classes never include '' or 'None'.
    """
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), column, stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None
    if key is not None and key in _LABELS_READ:
        return _LABELS_READ[key]
    rows = read_table_lines(path)
    if not any(column in row for _, row in rows):
        raise DataError(f"{path}: no values in the label column '{column}'; set task.label_column or task.labels.")
    values = set()
    for line, row in rows:
        raw = _label_cell(row, column, path, line)
        if raw in MISSING_LABELS:
            raise DataError(_missing_label_message(path, line, raw))
        values.add(raw)
    numeric = all(v.lstrip("-").isdigit() for v in values)
    labels = tuple(sorted(values, key=int if numeric else str))
    if key is not None:
        _LABELS_READ[key] = labels
    return labels


_LABELS_READ: dict[tuple[str, str, int, int], tuple[str, ...]] = {}  # a sweep's checks read the file once


def _hub_unreachable_errors() -> tuple[type[BaseException], ...]:
    # datasets wraps most network failures (and offline mode) in ConnectionError; these are the rest.
    from huggingface_hub.errors import LocalEntryNotFoundError

    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, LocalEntryNotFoundError)
    try:
        import httpx
    except ImportError:
        return errors
    return errors + (httpx.TransportError,)


class HubUnreachable(DataError):
    """The Hub (or the `data.hub_dataset` folder) could not give a split."""


def _hub_split(task: GlueTask, split: str, hub_dataset: str = HUB_DATASET) -> datasets.Dataset:
    """A split read by `datasets.load_dataset(hub_dataset, <task config>, split=...)`: from the Hub, or from a
    local folder in the Hub dataset's layout (kdexp.hub_folder)."""
    location = str(Path(hub_dataset).expanduser().resolve()) if Path(hub_dataset).expanduser().is_dir() else hub_dataset
    try:
        ds = datasets.load_dataset(location, task.hub_config, split=split)
    except _hub_unreachable_errors() as err:
        cause = " ".join(str(err).split())[:200] or type(err).__name__
        raise HubUnreachable(
            f"The Hugging Face Hub could not be reached for {hub_dataset}/{task.hub_config} ({cause}); "
            f"to read local files instead set GLUE_DIR=<folder> or data.glue_dir=<folder> with the classic "
            f"GLUE layout (e.g. ../shared/glue_data), and data.source auto or local, or data.hub_dataset=<folder> "
            "in the Hub's layout (python -m kdexp.hub_folder), or use your own files with task=custom."
        ) from err
    keep = list(task.text_fields) + ["label"]
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def _hub_load(name: str, config: str | None, split: str, revision: str | None = None) -> datasets.Dataset:
    """`datasets.load_dataset` of a Hub dataset, its unreachability one line naming where else data comes from."""
    try:
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except _hub_unreachable_errors() as err:
        cause = " ".join(str(err).split())[:200] or type(err).__name__
        raise HubUnreachable(
            f"The Hugging Face Hub could not be reached for {name} ({cause}); set MRC_DIR=<folder> or data.mrc_dir="
            "<folder> holding the official release (e.g. ../shared/mrc_data), or task.train_file / task.dev_file."
        ) from err


def _source_split(task: GlueTask, split: str, source: DataSource) -> datasets.Dataset:
    """A split from the GLUE folder or the Hub dataset; with `embedded_fallback`, from the shipped slice when
    the Hub cannot give it. Machine reading comprehension: own files, the official release under MRC_DIR,
    or the task's Hub dataset (kdexp.families)."""
    if task.family != CLASSIFICATION:
        local = families.read_local_split(task, split, source.mrc_dir)
        return local if local is not None else families.read_hub_split(task, split, _hub_load)
    if source.glue_dir is not None:
        return _local_split(task, split, source.glue_dir)
    try:
        return _hub_split(task, split, source.hub_dataset)
    except HubUnreachable:
        if not (source.embedded_fallback and task.name in EMBEDDED_TASKS):
            raise
    log.warning(
        "%s/%s: no GLUE_DIR is set and the Hub cannot be reached: using the %s slice shipped with kdexp "
        "(%s; set GLUE_DIR or data.source=hub for the whole task).",
        task.name,
        split,
        task.local_dir,
        EMBEDDED_GLUE_DIR / "README.md",
    )
    return _local_split(task, split, EMBEDDED_GLUE_DIR)


def _split_location(task: GlueTask, split: str, source: DataSource) -> str:
    if task.files:
        return task.files[split]
    if source.glue_dir is None:
        return f"{source.description}/{task.hub_config} split '{split}'"
    return str(source.glue_dir / task.local_dir / _local_layout(task, split).file)


def check_max_samples(max_samples: int | None, key: str) -> None:
    """`max_samples` is None (every row) or a positive row count; `key` is the config key it came from."""
    if max_samples is None:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral) or max_samples < 1:
        raise DataError(f"{key}={max_samples!r}: must be a positive number of rows or null (every row).")


def _max_samples_key(task: GlueTask, split: str) -> str:
    return "data.max_train_samples" if split == task.train_split else "data.max_eval_samples"


def load_split(
    task: GlueTask, split: str, source: DataSource, max_samples: int | None = None, samples_key: str | None = None
) -> datasets.Dataset:
    """Load one split with columns `task.text_fields` and `label`, sliced to its first `max_samples` rows.

    `samples_key` names the config key of `max_samples` in errors (default: the `data.` key for the split).
    """
    check_max_samples(max_samples, samples_key or _max_samples_key(task, split))
    if task.files and task.family == CLASSIFICATION:
        ds = file_split(task, split)
    else:
        ds = _source_split(task, split, source)
    if len(ds) == 0:
        raise DataError(
            f"{_split_location(task, split, source)}: no rows for task {task.name}; use data with rows "
            f"in its {split} split (data.glue_dir / GLUE_DIR, or data.source=hub)."
        )
    if "label" in ds.column_names and not task.is_regression:
        bad = invalid_label_rows(ds, task.num_labels)
        if len(bad):  # Hub test splits carry -1: never used for metrics
            raise DataError(f"{source.description} {task.name}/{split}: rows {bad[:5].tolist()} have no valid label.")
    if max_samples is not None and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    return ds


# --------------------------------------------------------------------------- tokenising


def arrow_column(ds: datasets.Dataset, column: str) -> pa.ChunkedArray:
    """One column of a dataset as Arrow (its row selection applied), without a Python object per row."""
    return ds.select_columns([column]).with_format("arrow")[:][column]


def invalid_label_rows(ds: datasets.Dataset, num_labels: int) -> np.ndarray:
    """The indices of the rows whose label is not a class id in [0, num_labels) (read through Arrow)."""
    labels = arrow_column(ds, "label")
    valid = pc.fill_null(pc.and_(pc.greater_equal(labels, 0), pc.less(labels, num_labels)), False)
    return np.flatnonzero(~valid.to_numpy(zero_copy_only=False))


def content_fingerprint(ds: datasets.Dataset, columns: tuple[str, ...]) -> str:
    """A digest of the values of `columns`: sha256 over each column's name and `repr(value) + NUL` per row.

    The rows are read through Arrow and joined in one call: seconds for MNLI's 393k pairs become a
    fraction of a second (the digest is the one a row-by-row loop gives).
    """
    digest = hashlib.sha256()
    for column in columns:
        digest.update(column.encode())
        values = arrow_column(ds, column).to_pylist()
        if values:
            digest.update(("\x00".join(map(repr, values)) + "\x00").encode())
    return digest.hexdigest()[:20]


def row_lengths(tokenized: datasets.Dataset) -> np.ndarray:
    """The number of tokens of every row of a tokenised split (Arrow's list lengths: no row materialised); a
    multiple-choice row of C sequences counts as a batch does, C times its longest."""
    column = arrow_column(tokenized, "input_ids")
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    if not pa.types.is_list(column.type.value_type):
        return lengths
    inner = pc.list_value_length(pc.list_flatten(column)).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.maximum.reduceat(inner, starts) * lengths if len(inner) else lengths


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    cached = getattr(tokenizer, "_kdexp_fingerprint", None)
    if cached:
        return cached
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(repr(vocab).encode())
    digest.update(type(tokenizer).__name__.encode())
    digest.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    if (
        "token_type_ids" not in tokenizer.model_input_names
    ):  # no segment ids in its rows (BERT's keys stay as they were)
        digest.update(b"no token_type_ids")
    tokenizer._kdexp_fingerprint = digest.hexdigest()[:20]
    return tokenizer._kdexp_fingerprint


# The columns besides the text fields that a row of a family's raw split holds.
FAMILY_COLUMNS = {CLASSIFICATION: ("label",), MULTIPLE_CHOICE: ("choices", "label"), EXTRACTIVE_QA: ("id", "answers")}


@dataclass(frozen=True)
class InputForm:
    """How rows become model inputs besides the tokenizer and the length: a multiple-choice row as option
    `pairs` or one `prompt` (decoder LMs), and whether a question with options too long for the length is cut
    (augmented copies, whose originals fitted) rather than refused; extractive QA's window stride."""

    form: str = "pairs"
    doc_stride: int = 128
    cut_long_options: bool = False

    def key_parts(self, task: GlueTask) -> dict[str, Any]:
        if task.family == MULTIPLE_CHOICE:  # inputs 2: cloze blanks filled by the option; a BOS-adding tokenizer's BOS
            version = 3 if self.form == "prompt" else 2  # 3: a cut prompt keeps its "Context:" label
            return {
                "form": self.form,
                "inputs": version,
                **({"cut_long_options": True} if self.cut_long_options else {}),
            }
        if task.family == EXTRACTIVE_QA:
            return {"doc_stride": self.doc_stride}
        return {}  # classification: keys made before families existed stay valid


def tokenized_key(
    ds: datasets.Dataset,
    task: GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    inputs: InputForm | None = None,
) -> str:
    """The cache key of a tokenised split: its content, the tokenizer, the maximum length (and input form)."""
    columns = tuple(task.text_fields) + tuple(c for c in FAMILY_COLUMNS[task.family] if c in ds.column_names)
    return cache_key(
        kind="tokenized",
        task=task.name,
        content=content_fingerprint(ds, columns),
        tokenizer=tokenizer_fingerprint(tokenizer),
        max_length=max_length,
        **(inputs or InputForm()).key_parts(task),
    )


def tokenize_split(
    ds: datasets.Dataset,
    task: GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    cache_dir: Path,
    inputs: InputForm | None = None,
) -> tuple[datasets.Dataset, str]:
    """Tokenise once; later calls with the same inputs load the cached result. Returns (data, key).

    The result has the model inputs, `labels` and `idx` (the row number, used to look up
    cached teacher signals for the rows of a batch). For extractive QA a row is a window of an
    example (`example_index`), so there may be more rows than examples.
    """
    inputs = inputs or InputForm()
    key = tokenized_key(ds, task, tokenizer, max_length, inputs)
    target = cache_dir / "tokenized" / key
    stored = _stored_tokenized(target)
    if stored is not None:
        return stored, key
    if not is_global_zero():  # DDP: the first process tokenises, the others read its copy
        return wait_for_rank_zero(target, lambda: _stored_tokenized(target, set_aside=False)), key

    make_inputs = families.featurizer(
        task, tokenizer, max_length, inputs.form, inputs.doc_stride, inputs.cut_long_options
    )

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        encoded = make_inputs(batch)
        if "example_index" in encoded:  # windows name their example within the batch: make it the split's row
            encoded["example_index"] = [indices[i] for i in encoded["example_index"]]
        return encoded

    tokenized = ds.map(
        encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenize {task.name}"
    )
    tokenized = tokenized.add_column("idx", np.arange(len(tokenized)))
    with atomic_directory(target) as tmp:
        tokenized.save_to_disk(str(tmp))
    return datasets.load_from_disk(str(target)), key


def _stored_tokenized(target: Path, set_aside: bool = True) -> datasets.Dataset | None:
    """The tokenised split stored at `target`, or None (an unreadable copy is removed when `set_aside`)."""
    if not (target / "dataset_info.json").exists():
        return None
    try:
        return datasets.load_from_disk(str(target))
    except Exception as err:
        if set_aside:
            log.warning("Tokenised cache %s unreadable (%s); rebuilding.", target, err)
            shutil.rmtree(target, ignore_errors=True)
        return None


def pad_batch(examples: list[dict[str, Any]], pad_token_id: int, regression: bool = False) -> dict[str, torch.Tensor]:
    """Collate examples into tensors padded to the longest sequence of the batch: ``[B, L]``, or ``[B, C, L]``
    for multiple-choice rows (one sequence per option); extractive QA's windows also bring ``context_mask``
    and their ``example_index``."""
    batch: dict[str, torch.Tensor] = {}
    per_option = isinstance(examples[0]["input_ids"][0], list)
    sequences = [seq for e in examples for seq in (e["input_ids"] if per_option else [e["input_ids"]])]
    longest = max(len(seq) for seq in sequences)
    for name in (*MODEL_INPUTS, "context_mask"):
        if name not in examples[0]:
            continue
        pad_value = pad_token_id if name == "input_ids" else 0
        values = [seq for e in examples for seq in (e[name] if per_option else [e[name]])]
        rows = torch.full((len(values), longest), pad_value, dtype=torch.long)
        for i, row in enumerate(values):
            rows[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        batch[name] = rows.view(len(examples), -1, longest) if per_option else rows
    if "labels" in examples[0]:
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=dtype)
    batch["idx"] = torch.tensor([e["idx"] for e in examples], dtype=torch.long)
    if "example_index" in examples[0]:
        batch["example_index"] = torch.tensor([e["example_index"] for e in examples], dtype=torch.long)
    return batch


# --------------------------------------------------------------------------- one task's data


@dataclass
class TaskData:
    """The raw and tokenised splits of one task, as one run uses them."""

    task: GlueTask
    raw: dict[str, datasets.Dataset]
    tokenized: dict[str, datasets.Dataset]
    keys: dict[str, str]  # split -> tokenised cache key (content + tokenizer + max length)
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    cache_dir: Path
    inputs: InputForm = InputForm()

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @property
    def train(self) -> datasets.Dataset:
        return self.tokenized[self.task.train_split]

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return self.task.eval_splits


def load_task_data(
    task: GlueTask,
    source: DataSource,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    cache_dir: Path,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    inputs: InputForm | None = None,
) -> TaskData:
    check_max_samples(max_train_samples, "data.max_train_samples")
    check_max_samples(max_eval_samples, "data.max_eval_samples")
    inputs = inputs or InputForm()
    raw = {task.train_split: load_split(task, task.train_split, source, max_train_samples)}
    for split in task.eval_splits:
        raw[split] = load_split(task, split, source, max_eval_samples)
    tokenized, keys = {}, {}
    for name, ds in raw.items():
        tokenized[name], keys[name] = tokenize_split(ds, task, tokenizer, max_length, cache_dir, inputs)
    return TaskData(task, raw, tokenized, keys, tokenizer, max_length, cache_dir, inputs)


def make_loader(
    ds: datasets.Dataset,
    data: TaskData,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    regression = data.task.is_regression
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=lambda examples: pad_batch(examples, data.pad_token_id, regression),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
