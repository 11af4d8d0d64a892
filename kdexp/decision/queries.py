"""DBKD's query stage: ``N`` inputs per training example, the teacher's top-1 decision on each.

For training row ``i`` the queries are the original input followed by ``N - 1`` EDA copies
(:mod:`kdexp.decision.eda`) drawn from ``example_random(seed, i)``, so the copies of a row
depend only on its text, the augmentation settings, ``N`` and the seed (not on the other
rows or on the slice size). Every query goes through :meth:`DecisionTeacher.decide` in
batches; the result is the ``[n, N]`` table of decisions (column 0: the original input), from
which the counts ``c = [n, C]`` follow.

Two cache entries, both content-addressed (`kdexp.cache`), shared by every run of a sweep and
every method that needs decisions:

* the augmented copies, a ``datasets.Dataset`` of ``n·(N - 1)`` rows in row-major order
  (row ``i``'s copies at ``i·(N-1) .. i·(N-1) + N-2``) with the task's text columns plus
  ``row`` and ``copy`` (``1..N-1``), under ``<cache>/decision/augmented/<key>``; its key hashes
  the raw training texts, the task, the EDA settings, ``N``, the seed (and the WordNet files
  when an operation uses WordNet). It does not depend on the teacher.
* the decisions, ``save_tensors`` under ``<cache>/signals/decisions/<key>.pt`` with ``decisions``
  ``[n, N]`` and ``counts`` ``[n, C]`` (int64); the key adds the teacher's key and what shapes
  its answers (its tokenizer and the maximum length) to the augmentation key. The metadata
  also records how long the stage took when it ran (``augment_seconds``, ``query_seconds``).

Both are made `chunk_rows` rows at a time (the copies written as they are made, the queries of a
chunk tokenised and answered together), so the stage's memory does not grow with the split:
MNLI with ``N = 10`` is 3.9M queries. Answered chunks are kept next to the entry
(``<key>.pt.partial/``) until the table is stored, so a killed stage resumes from its last chunk.

``batch_size`` changes only speed, so it is not part of the keys.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.arrow_writer import ArrowWriter

from kdexp.cache import (
    atomic_directory,
    cache_key,
    load_or_compute_together,
    load_tensors,
    save_tensors,
    wait_for_rank_zero,
)
from kdexp.data import arrow_column, content_fingerprint
from kdexp.decision.eda import EDAConfig, augment, augment_copies, authors_rates, clean_text, example_random
from kdexp.decision.teacher import DecisionTeacher, Query
from kdexp.decision.wordnet import DEFAULT_WORDNET_PATH, PARTS_OF_SPEECH, shared_wordnet
from kdexp.faults import maybe_fail
from kdexp.hardware import is_global_zero
from kdexp.tasks import MULTIPLE_CHOICE, GlueTask

log = logging.getLogger(__name__)

# Rows per chunk of the query stage (each with N queries): what bounds its memory at any size. A
# multiple-choice row is one sequence per option, so its chunks hold CHUNK_ROWS sequences' worth of rows.
CHUNK_ROWS = 20_000


@dataclass(frozen=True)
class QueryConfig:
    """The ``queries`` block of the decision methods' configs.

    Attributes:
        num_queries: ``N``, the inputs per example: the original and ``N - 1`` EDA copies (paper: 10).
        seed: seed of the augmentation (independent of the run's seed, so that the seeds of a
            sweep share one query stage).
        batch_size: queries per teacher batch (null: the teacher's ``eval_batch_size``); speed only.
        eda: the EDA operations and change-rate distribution (paper default: no synonym replacement).
    """

    num_queries: int = 10
    seed: int = 0
    batch_size: int | None = None
    eda: EDAConfig = field(default_factory=EDAConfig)

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"queries.num_queries must be at least 1 (the original input), got {self.num_queries}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "QueryConfig":
        values = dict(options or {})
        eda = values.pop("eda", None) or {}
        unknown = set(values) - {"num_queries", "seed", "batch_size"}
        if unknown:
            raise TypeError(f"unknown queries option(s) {sorted(unknown)}; valid: num_queries, seed, batch_size, eda")
        try:
            return cls(eda=EDAConfig(**eda), **values)
        except TypeError as err:
            raise TypeError(f"queries.eda: {err}") from None

    @property
    def num_copies(self) -> int:
        return self.num_queries - 1

    @property
    def asks_raw_original(self) -> bool:
        """Whether each row is also asked once as it stands. In the authors' style the first of the ``N``
        queries is the cleaned text, while their hard-label baseline asks the teacher about the raw input
        (cleaning drops digits, which can leave options that read the same)."""
        return self.eda.style == "authors"


@dataclass
class DecisionQueries:
    """The teacher's decisions on every query of the training split.

    Attributes:
        decisions: ``[n, N]`` int64 top-1 labels; column 0 is the original input.
        num_labels: ``C``.
        key: cache key of the decisions.
        augmentation_key: cache key of the augmented copies.
        copies_path: folder of the augmented copies (``datasets.load_from_disk``).
        from_cache: whether the decisions were read from the cache (no teacher query made).
        augment_seconds, query_seconds: wall time of the augmentation and of the teacher's
            answers when the stage ran (read back from the cache otherwise).
        raw_originals: ``[n]`` the decisions on the inputs as they stand, asked besides the ``N`` queries
            when their first one is a cleaned text (EDA in the authors' style); None otherwise.
        off_label_queries: of all the queries asked, those a decoder teacher answered with a top token that
            is no label word (its decision is then the best label word); None for other teachers.
    """

    decisions: torch.Tensor
    num_labels: int
    key: str
    augmentation_key: str
    copies_path: Path
    from_cache: bool
    augment_seconds: float = 0.0
    query_seconds: float = 0.0
    raw_originals: torch.Tensor | None = None
    off_label_queries: int | None = None

    @property
    def num_examples(self) -> int:
        return int(self.decisions.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.decisions.shape[1])

    @property
    def counts(self) -> torch.Tensor:
        """``[n, C]`` int64 decision counts (each row sums to ``N``)."""
        return decision_counts(self.decisions, self.num_labels)

    @property
    def original_decisions(self) -> torch.Tensor:
        """``[n]`` the teacher's top-1 label on the original inputs (as they stand, not cleaned)."""
        return self.decisions[:, 0] if self.raw_originals is None else self.raw_originals

    def copies(self) -> datasets.Dataset:
        return datasets.load_from_disk(str(self.copies_path))


def decision_counts(decisions: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``[n, C]`` counts of the labels in each row of ``decisions`` ``[n, N]``."""
    return torch.nn.functional.one_hot(decisions.long(), num_labels).sum(dim=1)


def query_fields(task: GlueTask) -> list[str]:
    """The texts of a query, as columns: the text fields; multiple choice adds one column per option
    (``choice_0``, ...), so that EDA changes the passage, the question and the options (the authors' way)."""
    if task.family == MULTIPLE_CHOICE:
        return [*task.text_fields, *(f"choice_{i}" for i in range(task.num_labels))]
    return list(task.text_fields)


def examples_of(ds: datasets.Dataset, task: GlueTask) -> list[Query]:
    """The inputs of a raw split (or of its copies): texts, ``(text_a, text_b)`` pairs, or for multiple choice
    ``(passage, question, option, ...)`` tuples."""
    if task.family == MULTIPLE_CHOICE and "choices" in ds.column_names:
        base = [arrow_column(ds, name).to_pylist() for name in task.text_fields]
        return [(*texts, *choices) for *texts, choices in zip(*base, arrow_column(ds, "choices").to_pylist())]
    columns = [arrow_column(ds, name).to_pylist() for name in query_fields(task)]
    if len(columns) == 1:
        return list(columns[0])
    return list(zip(*columns))


def augment_examples(examples: list[Query], config: QueryConfig, first_index: int = 0) -> list[list[Query]]:
    """The ``N - 1`` EDA copies of each example; example ``i`` (counted from ``first_index``: a chunk of a
    split) uses ``example_random(seed, i)``."""
    if config.num_copies == 0:
        return [[] for _ in examples]
    wordnet = shared_wordnet() if config.eda.needs_wordnet else None
    copies: list[list[Query]] = []
    for index, example in enumerate(examples, start=first_index):
        rng = example_random(config.seed, index)
        if config.eda.style == "authors":
            sides = [
                _authors_side_copies(text, config, index, side, rng, wordnet)
                for side, text in enumerate((example,) if isinstance(example, str) else example)
            ]
            copies.append(list(sides[0]) if isinstance(example, str) else list(zip(*sides)))
        elif isinstance(example, str):
            copies.append(list(augment(example, config.num_copies, rng, config.eda, wordnet)))
        else:  # each text augmented on its own, in order (for a pair: `augment_pair`)
            copies.append(list(zip(*(augment(text, config.num_copies, rng, config.eda, wordnet) for text in example))))
    return copies


def _authors_side_copies(
    text: str, config: QueryConfig, index: int, side: int, rng: random.Random, wordnet: Any
) -> list[str]:
    """One side's copies in the authors' style: the rates of its chunk of rows, cleaned text."""
    if not clean_text(text):  # their cleaning fails on a text without letters: the raw text N times
        return [text] * config.num_copies
    rates = chunk_rates(config, index, side)
    return [copy.text for copy in augment_copies(text, config.num_copies, rng, config.eda, wordnet, rates)]


def chunk_rates(config: QueryConfig, index: int, side: int) -> dict[Any, float]:
    """The authors' style: the change rates shared by row ``index``'s chunk of ``rows_per_draw`` rows."""
    chunk = index // config.eda.rows_per_draw
    return authors_rates(random.Random(f"eda-rates/{config.seed}/{chunk}/{side}"), config.eda)


def original_query(example: Query, config: QueryConfig) -> Query:
    """The first of a row's ``N`` queries: the input itself, cleaned in the authors' style."""
    if config.eda.style != "authors":
        return example
    if isinstance(example, str):
        return clean_text(example) or example
    return tuple(clean_text(text) or text for text in example)


def _eda_key(eda: EDAConfig) -> dict[str, Any]:
    """The EDA settings in a key; options at their defaults are left out, so keys made before they existed hold."""
    values = asdict(eda)
    for name, default in (("style", "kdexp"), ("rows_per_draw", 1000)):
        if values[name] == default:
            del values[name]
    return values


def _wordnet_fingerprint(path: str = DEFAULT_WORDNET_PATH) -> list[Any]:
    files = [Path(path) / f"{kind}.{pos}" for pos in PARTS_OF_SPEECH for kind in ("index", "data")]
    return [[f.name, f.stat().st_size] for f in files if f.exists()]


def augmentation_key(ds: datasets.Dataset, task: GlueTask, config: QueryConfig) -> str:
    return cache_key(
        kind="eda_copies",
        task=task.name,
        content=content_fingerprint(
            ds, tuple(task.text_fields) + (("choices",) if "choices" in ds.column_names else ())
        ),
        rows=len(ds),
        eda=_eda_key(config.eda),
        num_queries=config.num_queries,
        seed=config.seed,
        wordnet=_wordnet_fingerprint() if config.eda.needs_wordnet else None,
    )


def chunk_rows(task: GlueTask) -> int:
    """Rows per chunk of `task`'s copies and queries: `CHUNK_ROWS`, over the options of a multiple-choice row
    (RACE's 4 sequences of up to 512 tokens a query would otherwise hold ~7 GB of token ids a chunk)."""
    sequences = task.num_labels if task.family == MULTIPLE_CHOICE else 1
    return max(1, CHUNK_ROWS // sequences)


def decisions_key(teacher: DecisionTeacher, augmentation: str, rows: int = 0, rows_per_chunk: int = 0) -> str:
    """The key of a decisions table. Past one chunk the batch plan is per chunk, which may change a float's
    last bits and so a near-tie's answer: the chunk size is then part of the key."""
    size = rows_per_chunk or CHUNK_ROWS
    chunks = {"chunk_rows": size} if rows > size else {}
    return cache_key(
        kind="decisions", teacher=teacher.key, answers=teacher.identity, augmentation=augmentation, **chunks
    )


def copies_as_raw(copies: datasets.Dataset, task: GlueTask) -> datasets.Dataset:
    """Augmented copies in the raw split's columns (without ``row`` and ``copy``): for multiple choice the
    options' columns become the ``choices`` list again."""
    copies = copies.remove_columns(["row", "copy"])
    if task.family != MULTIPLE_CHOICE:
        return copies
    options = [f"choice_{i}" for i in range(task.num_labels)]
    return copies.map(lambda row: {"choices": [row[name] for name in options]}, remove_columns=options)


def _copies_columns(copies: list[list[Query]], task: GlueTask, first_row: int) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {name: [] for name in query_fields(task)}
    columns["row"], columns["copy"] = [], []
    for row, row_copies in enumerate(copies, start=first_row):
        for number, copy in enumerate(row_copies, start=1):
            texts = (copy,) if isinstance(copy, str) else copy
            for name, text in zip(query_fields(task), texts):
                columns[name].append(text)
            columns["row"].append(row)
            columns["copy"].append(number)
    return columns


def _copies_features(task: GlueTask) -> datasets.Features:
    return datasets.Features(
        {
            **{name: datasets.Value("string") for name in query_fields(task)},
            "row": datasets.Value("int64"),
            "copy": datasets.Value("int64"),
        }
    )


def row_chunks(rows: int, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` (default `CHUNK_ROWS`) rows covering ``rows``."""
    size = size or CHUNK_ROWS
    return [(start, min(start + size, rows)) for start in range(0, rows, size)]


def _load_or_augment(
    ds: datasets.Dataset, task: GlueTask, config: QueryConfig, cache_dir: Path
) -> tuple[str, Path, float]:
    """The copies' key and folder (made now if missing, chunk by chunk), and the seconds making them took."""
    key = augmentation_key(ds, task, config)
    path = cache_dir / "decision" / "augmented" / key
    expected_rows = len(ds) * config.num_copies
    if _stored_copies(path, expected_rows, report=True):
        log.info("Reusing augmented copies %s", path)
        return key, path, 0.0
    if not is_global_zero():  # DDP: the first process augments, the others read its copies
        wait_for_rank_zero(path, lambda: _stored_copies(path, expected_rows) or None)
        return key, path, 0.0
    start = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrow_file = path.with_name(f".{key}.{os.getpid()}.arrow.tmp")
    try:
        with ArrowWriter(features=_copies_features(task), path=str(arrow_file)) as writer:
            for first, stop in row_chunks(len(ds), chunk_rows(task)):  # a chunk in memory at a time, written as made
                chunk = augment_examples(examples_of(ds.select(range(first, stop)), task), config, first)
                writer.write_batch(_copies_columns(chunk, task, first))
            writer.finalize()
        with atomic_directory(path) as tmp:
            datasets.Dataset.from_file(str(arrow_file)).save_to_disk(str(tmp))
    finally:
        arrow_file.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    log.info("EDA: %d copies of %d examples in %.1fs", config.num_copies, len(ds), seconds)
    return key, path, seconds


def _stored_copies(path: Path, expected_rows: int, report: bool = False) -> bool:
    """Whether `path` holds the augmented copies, whole."""
    if not (path / "dataset_info.json").exists():
        return False
    try:
        return len(datasets.load_from_disk(str(path))) == expected_rows
    except Exception as err:  # a foreign or damaged folder: make it again
        if report:
            log.warning("Augmented copies %s unreadable (%s); making them again.", path, err)
        return False


def query_decisions(
    teacher: DecisionTeacher,
    ds: datasets.Dataset,
    task: GlueTask,
    config: QueryConfig,
    cache_dir: Path,
) -> DecisionQueries:
    """The teacher's decisions on the ``N`` queries of every row of the raw split ``ds`` (cached).

    A cache hit makes no teacher query (and does not even load the teacher's model). The queries
    are asked chunk by chunk (`chunk_rows` rows, ``N`` queries each), so memory is bounded at any
    size, and each answered chunk is kept (``<entry>.partial/``) until the whole table is stored:
    a killed stage resumes from its last chunk.
    """
    if task.is_regression:
        raise ValueError(f"decision queries need a classification task; {task.name} is regression")
    aug_key, copies_path, augment_seconds = _load_or_augment(ds, task, config, Path(cache_dir))
    key = decisions_key(teacher, aug_key, len(ds), chunk_rows(task))
    path = Path(cache_dir) / "signals" / "decisions" / f"{key}.pt"
    expected = {"key": key, "rows": len(ds), "num_queries": config.num_queries, "num_labels": teacher.num_labels}
    if config.asks_raw_original:  # a table stored before raw originals were asked lacks them: ask again
        expected["raw_originals"] = True

    def load() -> DecisionQueries | None:
        cached = load_tensors(path, expected)
        if cached is None:
            return None
        decisions, raw = cached.get("decisions"), cached.get("raw_originals")
        whole = decisions is not None and decisions.shape == (len(ds), config.num_queries)
        if (
            decisions is not None
            and whole
            and decisions.dtype == torch.long
            and (raw is not None) == config.asks_raw_original
        ):
            meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
            log.info(
                "Reusing decision queries %s (%d examples x %d queries; no teacher query made)",
                path,
                len(ds),
                config.num_queries,
            )
            return DecisionQueries(
                decisions,
                teacher.num_labels,
                key,
                aug_key,
                copies_path,
                True,
                float(meta.get("augment_seconds", 0.0)),
                float(meta.get("query_seconds", 0.0)),
                raw,
                meta.get("off_label_queries"),
            )
        log.warning("Cached decisions %s have the wrong shape; querying again.", path)
        return None

    def query() -> DecisionQueries:
        decisions, raw, seconds, off_label = _answer_in_chunks(
            teacher, ds, task, config, copies_path, chunk_folder(path)
        )
        return DecisionQueries(
            decisions, teacher.num_labels, key, aug_key, copies_path, False, augment_seconds, seconds, raw, off_label
        )

    def store(queries: DecisionQueries) -> None:
        meta = dict(expected, augment_seconds=queries.augment_seconds, query_seconds=queries.query_seconds)
        if queries.off_label_queries is not None:
            meta["off_label_queries"] = queries.off_label_queries
        tensors = {"decisions": queries.decisions, "counts": queries.counts}
        if queries.raw_originals is not None:
            tensors["raw_originals"] = queries.raw_originals
        save_tensors(path, tensors, meta)
        shutil.rmtree(chunk_folder(path), ignore_errors=True)

    return load_or_compute_together(path, load, query, store, teacher.hardware)


def chunk_folder(path: Path) -> Path:
    """Where the answered chunks of a decisions entry wait until the whole table is stored."""
    return path.with_name(path.name + ".partial")


def _chunk_queries(
    ds: datasets.Dataset, copies: datasets.Dataset, task: GlueTask, config: QueryConfig, start: int, stop: int
) -> list[Query]:
    """The queries of rows ``start..stop``, row after row: the ``N`` (the original, then its copies), and the
    original as it stands where the first is cleaned (`QueryConfig.asks_raw_original`)."""
    originals = examples_of(ds.select(range(start, stop)), task)
    row_copies = examples_of(copies.select(range(start * config.num_copies, stop * config.num_copies)), task)
    queries: list[Query] = []
    for offset, original in enumerate(originals):
        queries.append(original_query(original, config))
        queries.extend(row_copies[offset * config.num_copies : (offset + 1) * config.num_copies])
        if config.asks_raw_original:
            queries.append(original)
    return queries


def _answer_in_chunks(
    teacher: DecisionTeacher,
    ds: datasets.Dataset,
    task: GlueTask,
    config: QueryConfig,
    copies_path: Path,
    partial: Path,
) -> tuple[torch.Tensor, torch.Tensor | None, float, int | None]:
    """``[n, N]`` decisions (and ``[n]`` raw originals, or None), the seconds spent and the off-label answers
    (None when the teacher counts none), chunk by chunk; chunks answered by an earlier (killed) attempt are
    read back."""
    hardware = teacher.hardware
    copies = datasets.load_from_disk(str(copies_path))
    width = config.num_queries + int(config.asks_raw_original)  # queries asked per row
    answered_rows = torch.zeros(len(ds), width, dtype=torch.long)
    seconds = 0.0
    off_label: int | None = None
    uncounted_chunk = False  # a chunk stored before off-label answers were counted: no fraction then
    log.info(
        "Querying the teacher: %d examples x %d queries = %d decisions",
        len(ds),
        width,
        len(ds) * width,
    )
    for start, stop in row_chunks(len(ds), chunk_rows(task)):
        chunk_file = partial / f"rows-{start}-{stop}.pt"
        expected = {"rows": [start, stop], "num_queries": config.num_queries}
        if config.asks_raw_original:
            expected["width"] = width
        answered = load_tensors(chunk_file, expected)
        if hardware.all_true(answered is not None):
            assert answered is not None  # true on every process, so on this one
            answered_rows[start:stop] = answered["decisions"]
            if "off_label" in answered:
                off_label = (off_label or 0) + int(answered["off_label"])
            else:
                uncounted_chunk = True
            continue
        began = time.perf_counter()
        counted_before = teacher.tally.get("off_label")
        answers = teacher.decide(_chunk_queries(ds, copies, task, config, start, stop))
        answered_rows[start:stop] = answers.reshape(stop - start, width)
        seconds += time.perf_counter() - began
        chunk = {"decisions": answered_rows[start:stop].clone()}
        if "off_label" in teacher.tally:
            chunk["off_label"] = torch.tensor(teacher.tally["off_label"] - (counted_before or 0))
            off_label = (off_label or 0) + int(chunk["off_label"])
        if hardware.is_global_zero:
            save_tensors(chunk_file, chunk, expected)
        maybe_fail("query_chunk", start=start)
    log.info(
        "Teacher decisions: %d queries in %.1fs (%.2f ms per query)",
        len(ds) * width,
        seconds,
        1000 * seconds / max(len(ds) * width, 1),
    )
    decisions = answered_rows[:, : config.num_queries].contiguous()
    raw = answered_rows[:, config.num_queries].clone() if config.asks_raw_original else None
    return decisions, raw, seconds, None if uncounted_chunk else off_label


def decision_statistics(queries: DecisionQueries, gold: torch.Tensor | None = None) -> dict[str, Any]:
    """Summary of the decisions: agreement, distinct count vectors, teacher accuracy on the originals."""
    counts = queries.counts
    n = max(queries.num_examples, 1)
    top = counts.max(dim=1).values
    distinct_sorted = torch.unique(torch.sort(counts, dim=1, descending=True).values, dim=0).shape[0]
    stats: dict[str, Any] = {
        "examples": queries.num_examples,
        "num_queries": queries.num_queries,
        "teacher_queries": queries.num_examples * (queries.num_queries + int(queries.raw_originals is not None)),
        "all_agree_fraction": float((top == queries.num_queries).sum()) / n,
        "mean_top_fraction": float(top.double().mean() / queries.num_queries) if queries.num_examples else 0.0,
        "copies_agree_with_original": float((queries.decisions[:, 1:] == queries.decisions[:, :1]).double().mean())
        if queries.num_queries > 1 and queries.num_examples
        else 1.0,
        "distinct_count_vectors": int(torch.unique(counts, dim=0).shape[0]),
        "distinct_sorted_count_vectors": int(distinct_sorted),
        "from_cache": queries.from_cache,
        "augment_seconds": queries.augment_seconds,
        "query_seconds": queries.query_seconds,
        "query_ms_per_example": 1000 * queries.query_seconds / n,
        "decisions_key": queries.key,
        "augmentation_key": queries.augmentation_key,
    }
    if queries.off_label_queries is not None:
        stats["off_label_fraction"] = queries.off_label_queries / max(stats["teacher_queries"], 1)
    if gold is not None and queries.num_examples:
        stats["teacher_train_accuracy"] = float((queries.original_decisions == gold.long()).double().mean())
    return stats
