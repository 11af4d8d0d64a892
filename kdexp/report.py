"""`kdexp-report <sweep folder>`: the paper-style table of a sweep, with the statistics of every cell.

Reads every `results.json` under the folder(s) and writes `report.md`, `report.csv`, `report.tex`
(booktabs, best value per column in bold), `report.svg` (bars with std error bars) and, with
matplotlib (`pip install 'kdexp[plots]'`), `report.png`/`.pdf` and a line plot per numeric option
swept (`report_method.alpha.png`, ...) in the first folder, or `--out`. Methods are rows, one row
per teacher first; columns are tasks (dev scores ×100), each task's main GLUE metric except the
papers' columns for the full-size tasks: MNLI-m and MNLI-mm (matched and mismatched accuracy),
QQP and MRPC accuracy and F1 (a run that did not write them, an older one, still shows its main
metric). Runs that differ in other overrides (e.g. `method.alpha`) get rows of their own;
overrides that cannot change a score (progress bar, logging, workers:
`kdexp.config.NON_RESULT_KEYS`) do not split rows. Several folders make one table, e.g. a method's
sweep next to the baselines' sweep run with the same settings.

Every cell holds the number of seeds n, the mean, the sample std and the 95% Student-t interval of
the mean (mean ± t_{0.975, n-1}·std/√n; none for one seed). Markdown: `76.7 ± 0.9 [75.6, 77.8] n=3`;
LaTeX: `76.7 ± 0.9`; the CSV: `<column>_mean`, `_std`, `_n`, `_ci_low`, `_ci_high` per column.

`--baseline METHOD` (a row of the table) compares every other row with it, per column, over the
seeds both ran (same task, teacher and seed): the mean paired difference, its 95% paired-t
interval, and two-sided p-values of the exact sign-flip permutation test and of the paired t test,
in a second Markdown table. A difference whose interval excludes 0 is marked † in the Markdown and
LaTeX tables; the CSV gets `<column>_diff`, `_diff_ci_low`, `_diff_ci_high`, `_p_permutation`,
`_p_t`, `_n_pairs`. A row with fewer than 2 shared seeds gets the difference alone, and says so.
A name that is no row of the table: one line listing the rows, exit status 2.

Nothing is hidden: run folders without `results.json` (failed or unfinished) and results.json files
that cannot be used (binary, not UTF-8, invalid or truncated JSON, required keys missing, another
schema version) are listed under the table, the latter also one line each on stderr; the table is
made from the rest and the exit status is 2 unless `--allow-missing` is given. Two results of the
same experiment (same task, row, teacher and seed) are refused rather than averaged as seeds.
`--select-on dev` turns each method's grid (rows differing in its options) into one row: per task
the cell with the best mean dev score, listed under the table with the cells it was chosen from.

From Python, `table_records(results)` gives the same rows and statistics as plain dicts (for wandb).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import random
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kdexp.config import is_result_key
from kdexp.errors import DataError, KdexpError
from kdexp.report_formats import (
    AVERAGE,
    DAGGER,
    average_column,
    load_reference,
    reference_markdown,
    reference_template,
    to_latex,
    to_svg,
)
from kdexp.report_plots import matplotlib_available, write_plots
from kdexp.run_folder import FAILED_FILE
from kdexp.tasks import EXTRACTIVE_QA, TASKS, GlueTask

RESULTS_FILE = "results.json"
# The column, the row's method and the seed themselves: never part of a row label.
TABLE_KEYS = ("task", "task.name", "seed", "method", "method.name")
# What a results.json must hold to be a row's score; `schema_version` absent means version 1.
REQUIRED_KEYS = ("task", "method", "seed", "main_metric", "metrics")
SCHEMA_KEY = "schema_version"
RESULTS_SCHEMA_VERSION = 1
CONFIDENCE = 0.95
# Above this many pairs the sign-flip test samples sign patterns instead of enumerating all 2^n.
EXACT_PERMUTATION_PAIRS = 16


# --------------------------------------------------------------------------- statistics


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return fraction


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function (the CDF of a Beta(a, b) variable at x)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; else by I_x(a, b) = 1 - I_{1-x}(b, a)
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / (df + t * t), df / 2.0, 0.5)


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (as scipy.stats.t.ppf), by bisection."""
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    target = 2.0 * (1.0 - p)  # the two-sided tail beyond the quantile
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_two_sided_p(middle, df) > target:
            low = middle
        else:
            high = middle
        if high - low <= 1e-15 * high:
            break
    return (low + high) / 2.0


def mean_interval(mean: float, std: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Student-t interval of a mean of n values with sample std `std`: mean ± t·std/√n; None for n < 2."""
    if n < 2:
        return None
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def _spread(differences: list[float]) -> float:
    """The sample std, 0 when the differences are equal but for rounding (scores ×100 are not exact)."""
    std = statistics.stdev(differences)
    return 0.0 if std <= 1e-9 * max(abs(d) for d in differences) else std


def paired_t_p(differences: list[float]) -> float:
    """The two-sided p-value of the paired t test (mean difference 0) on n >= 2 differences."""
    n, mean, std = len(differences), statistics.fmean(differences), _spread(differences)
    if std == 0.0:  # every pair differs by the same amount: no spread to weigh it against
        return 1.0 if mean == 0.0 else 0.0
    return t_two_sided_p(mean / (std / math.sqrt(n)), n - 1)


def sign_flip_p_value(differences: list[float], samples: int = 100_000, seed: int = 0) -> float:
    """The two-sided p-value of the sign-flip (paired permutation) test of a mean difference of 0.

    Under the null each difference is as likely negated: the p-value is the share of the 2^n sign
    patterns whose |sum| is at least the observed one, enumerated exactly for up to 16 pairs; above
    that, estimated from `samples` random patterns (seeded, so the report is reproducible) as
    (hits + 1) / (samples + 1).
    """
    observed = abs(math.fsum(differences))
    # Sums of the same numbers in another order differ in the last bits: such a tie is a tie.
    tolerance = 1e-9 * math.fsum(abs(d) for d in differences)
    if len(differences) <= EXACT_PERMUTATION_PAIRS:
        sums = [0.0]
        for d in differences:
            sums = [s + d for s in sums] + [s - d for s in sums]
        return sum(abs(s) >= observed - tolerance for s in sums) / len(sums)
    rng = random.Random(seed)
    hits = sum(
        abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed - tolerance for _ in range(samples)
    )
    return (hits + 1) / (samples + 1)


@dataclass(frozen=True)
class Difference:
    """A row's paired difference from the baseline row on one column (×100, row − baseline), over
    the runs both have (same teacher and seed). With fewer than 2 pairs: the difference alone."""

    n_pairs: int
    mean: float | None  # None without a shared seed
    ci: tuple[float, float] | None  # the 95% paired-t interval of the mean difference
    p_permutation: float | None
    p_t: float | None

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (what † marks)."""
        return self.ci is not None and (self.ci[0] > 0.0 or self.ci[1] < 0.0)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.ci or (None, None)
        return {
            "diff": self.mean,
            "diff_ci_low": low,
            "diff_ci_high": high,
            "p_permutation": self.p_permutation,
            "p_t": self.p_t,
            "n_pairs": self.n_pairs,
            "significant": self.significant,
        }


def difference_statistics(differences: list[float]) -> Difference:
    """Mean, 95% paired-t interval and both p-values of paired differences."""
    n = len(differences)
    if n == 0:
        return Difference(0, None, None, None, None)
    mean = statistics.fmean(differences)
    if n == 1:
        return Difference(1, mean, None, None, None)
    interval = mean_interval(mean, _spread(differences), n)
    return Difference(n, mean, interval, sign_flip_p_value(differences), paired_t_p(differences))


# --------------------------------------------------------------------------- the table's parts

ScoreKey = tuple[Any, int]  # (teacher key, seed): what pairs a run of one row with a run of another


def _key_order(key: ScoreKey) -> tuple[str, int]:
    return str(key[0]), key[1]


@dataclass(frozen=True)
class Cell:
    """One row's scores (×100) in one column: mean, sample std and their number n; `scores` keeps
    each by (teacher key, seed), which pairs it with the baseline's run of the same teacher and seed."""

    mean: float
    std: float
    n: int
    scores: tuple[tuple[ScoreKey, float], ...] = ()

    @property
    def ci(self) -> tuple[float, float] | None:
        """The 95% Student-t interval of the mean; None for one score."""
        return mean_interval(self.mean, self.std, self.n)

    def format(self) -> str:
        """`mean ± std` (the mean alone for one score), as the LaTeX table prints it."""
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"


@dataclass(frozen=True)
class Column:
    """A column of the table: one task's score under one metric of one dev split."""

    key: str  # "sst2", "mnli-mm", "qqp-f1": also the prefix of its CSV columns
    task: str
    metric: str | None  # its key in results.json `metrics`; None: the run's main metric, `val/<main_metric>`
    title: str

    def value(self, metrics: Mapping[str, Any], main_metric: str) -> float | None:
        return metrics.get(self.metric or f"val/{main_metric}")


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    rows: dict[str, dict[str, Cell]]  # row label -> column key -> cell
    selection: str = ""  # what `--select-on dev` chose, as a Markdown section
    baseline: str | None = None
    differences: dict[str, dict[str, Difference]] = field(default_factory=dict)  # row -> column key -> vs baseline

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.columns]

    @property
    def task_of(self) -> dict[str, str]:
        return {c.key: c.task for c in self.columns}

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(c.task for c in self.columns))

    def marks(self) -> dict[str, set[str]]:
        """Row -> the column keys where its difference from the baseline is marked †."""
        return {
            label: {k for k, d in by_column.items() if d.significant} for label, by_column in self.differences.items()
        }


@dataclass(frozen=True)
class Runs:
    results: list[Path]  # every results.json found
    unfinished: list[Path]  # run folders without one: failed or unfinished


@dataclass(frozen=True)
class Report:
    markdown: str
    unfinished: list[str]  # as listed under the table
    figures: list[Path]  # PNG and PDF files written (none without matplotlib)
    damaged: list[str] = field(default_factory=list)  # "<results.json as found>: what is wrong with it", one each
    environments: int = 1  # how many environments (kdexp.environment) made the runs
    unanswered: int = 0  # student runs whose SQuAD 2.0 F1 is only the unanswerable share
    students_at_floor: int = 0  # student runs no better on dev than the most frequent label
    teachers_at_floor: int = 0  # teachers (distinct keys) no better on dev than the most frequent label


class UnknownBaseline(KdexpError):
    """`--baseline` names no row of the table."""


# --------------------------------------------------------------------------- finding and reading runs


def is_run_folder(path: Path) -> bool:
    """A folder `kdexp-train` ran in (a run or one job of a sweep), finished or not."""
    return (path / ".hydra").is_dir() or (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """The results.json files under `folder`, and the run folders there that have none."""
    results, unfinished = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if RESULTS_FILE in filenames:
            results.append(here / RESULTS_FILE)
        if is_run_folder(here):
            # A run's subfolders hold no runs, and a results.json kept there (a copy) is not its result.
            dirnames.clear()
            if RESULTS_FILE not in filenames:
                unfinished.append(here)
    return results, unfinished


def find_runs(*folders: Path) -> Runs:
    """Every results.json and every unfinished run under the folders (each once if folders overlap)."""
    results: dict[Path, Path] = {}
    unfinished: dict[Path, Path] = {}
    for folder in folders:
        found, missing = _scan(folder)
        for path in found:
            results.setdefault(path.resolve(), path)
        for path in missing:
            unfinished.setdefault(path.resolve(), path)
    return Runs(sorted(results.values()), sorted(unfinished.values()))


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_problem(result: dict[str, Any], key: str) -> str | None:
    """What is wrong with `metrics` (or `teacher_metrics`, which may be absent), or None."""
    metrics = result.get(key)
    if metrics is None and key != "metrics":
        return None
    if not isinstance(metrics, dict):
        return f"`{key}` is a JSON {_json_type(metrics)}, not an object of metric: value"
    not_numbers = [name for name, value in metrics.items() if not _is_number(value)]
    if not_numbers:
        return f"`{key}` holds values that are not numbers: {', '.join(not_numbers[:3])}"
    if key != "metrics":
        return None  # a teacher's score that is no number (NaN) is left out of its row, not the student's result
    main = f"val/{result['main_metric']}"
    if main not in metrics:
        return f"`metrics` lacks {main}, the main metric `main_metric` names"
    shown = {c.metric or main for c in task_columns(result["task"])} | {main}
    for name in sorted(shown & set(metrics)):
        if not math.isfinite(metrics[name]):
            return f"`metrics` gives {name} = {metrics[name]}, not a score"
    return None


def result_problem(result: Any) -> str | None:
    """What keeps a parsed results.json out of the table (one line), or None when it can go in."""
    if not isinstance(result, dict):
        return f"a JSON {_json_type(result)}, not an object of results"
    version = result.get(SCHEMA_KEY, RESULTS_SCHEMA_VERSION)
    if version != RESULTS_SCHEMA_VERSION or isinstance(version, bool):
        return (
            f"schema version {_shown(version)}: this kdexp-report reads version {RESULTS_SCHEMA_VERSION} "
            f"(a results.json without `{SCHEMA_KEY}` is version {RESULTS_SCHEMA_VERSION})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in result]
    if missing:
        return f"lacks the required key{'s' * (len(missing) > 1)} {', '.join(missing)}"
    for key in ("task", "method", "main_metric"):
        if not isinstance(result[key], str) or not result[key]:
            return f"`{key}` is {_shown(result[key])}, not a name"
    if not isinstance(result["seed"], int) or isinstance(result["seed"], bool):
        return f"`seed` is {_shown(result['seed'])}, not an integer"
    for key in ("metrics", "teacher_metrics"):
        problem = _metrics_problem(result, key)
        if problem:
            return problem
    optional = {"teacher_key": (str, type(None)), "method_info": (dict, type(None)), "overrides": (list,)}
    for key, types in optional.items():
        if key in result and not isinstance(result[key], types):
            return f"`{key}` is a JSON {_json_type(result[key])}"
    if any(not isinstance(o, str) for o in result.get("overrides", [])):
        return "`overrides` holds something other than strings"
    return None


def read_result(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A results.json's content, or None and one line saying what is wrong with the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    if not data.strip():
        return None, "empty file"
    if b"\x00" in data:
        return None, "binary data (NUL bytes), not JSON text"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
    try:
        result = json.loads(text)
    except json.JSONDecodeError as err:
        if err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string"):
            return (
                None,
                f"truncated JSON: the file ends at line {text.count(chr(10)) + 1} before the JSON does ({err.msg})",
            )
        return None, f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
    except RecursionError:
        return None, "not valid JSON: nested too deeply"
    problem = result_problem(result)
    return (None, problem) if problem else (result, None)


def read_results(paths: list[Path]) -> tuple[dict[Path, dict[str, Any]], dict[Path, str]]:
    """The usable results (path -> content) and the damaged files (path -> what is wrong)."""
    results, damaged = {}, {}
    for path in paths:
        result, problem = read_result(path)
        if result is None:
            damaged[path] = problem or "unreadable"
        else:
            results[path] = result
    return results, damaged


def load_results(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """The usable results among `paths` (path -> content); `read_results` also says what the others lack."""
    return read_results(paths)[0]


# --------------------------------------------------------------------------- rows


def _splits_rows(key: str) -> bool:
    """`method.alpha` separates rows; the table's own keys and keys that cannot change a score do not."""
    return key not in TABLE_KEYS and is_result_key(key)


def _override_dict(result: dict[str, Any]) -> dict[str, str]:
    pairs = ((k.lstrip("+~"), v) for k, v in (o.split("=", 1) for o in result.get("overrides", []) if "=" in o))
    return {k: v for k, v in pairs if _splits_rows(k)}


def _config_value(result: dict[str, Any], key: str) -> str | None:
    """`key`'s value in the run's resolved config (results.json `config`) as text; None where the config holds
    none, or holds a config group there (a dict: the group's choice, the override, is what tells rows apart)."""
    node: Any = result.get("config") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if isinstance(node, dict) else str(node)


def _row_values(result: dict[str, Any], keys: set[str]) -> dict[str, str]:
    """The run's value of each of `keys` it overrode, or that its config holds: a run that got from the YAML what
    another run was given on the command line (an experiment's default changed between seeds) shares its row."""
    overrides = _override_dict(result)
    values = {k: overrides[k] if k in overrides else _config_value(result, k) for k in keys}
    return {k: v for k, v in values.items() if v is not None}


def _compared(result: dict[str, Any], key: str) -> str | None:
    value = _config_value(result, key)
    return value if value is not None else _override_dict(result).get(key)


def varying_overrides(results: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value is not the same in every run (what separates rows of one method): compared as the
    runs' configs hold them where they do, so `student.num_layers=4` and a YAML default of 4 are one value."""
    keys = {k for r in results for k in _override_dict(r)}
    return {k for k in keys if len({_compared(r, k) for r in results}) > 1}


DEV_REWARD_MARK = " [reward on dev]"


def row_label(result: dict[str, Any], shown: set[str]) -> str:
    """The method name plus the overrides that vary across the sweep (not task, seed, method).

    A run whose method was steered by the dev set (knowledge selection with `reward.split=dev`)
    is marked: its dev score is not a held-out score.
    """
    extra = [f"{k}={v}" for k, v in sorted(_row_values(result, shown).items())]
    label = result["method"] + (f" ({', '.join(extra)})" if extra else "")
    if (result.get("method_info") or {}).get("reward_split") == "dev":
        label += DEV_REWARD_MARK
    return label


def teacher_label(result: dict[str, Any], shown: set[str]) -> str:
    """The label "teacher", plus the `teacher.*` overrides that vary across the sweep."""
    extra = [f"{k}={v}" for k, v in sorted(_row_values(result, shown).items()) if k.startswith("teacher.")]
    return "teacher" + (f" ({', '.join(extra)})" if extra else "")


def is_teacher_row(label: str) -> bool:
    return label.startswith("teacher")


def refuse_duplicates(results: dict[Path, dict[str, Any]]) -> None:
    """Two results of one (task, row, teacher, seed) are one experiment run twice, not two seeds."""
    shown = varying_overrides(list(results.values()))
    seen: dict[tuple[Any, ...], Path] = {}
    for path, r in results.items():
        key = (r["task"], row_label(r, shown), r.get("teacher_key"), r["seed"])
        if key in seen:
            raise SystemExit(
                f"{seen[key]} and {path} are the same experiment ({key[0]}, {key[1]}, teacher "
                f"{key[2]}, seed {key[3]}) run twice, not two seeds: pass only one of the folders, "
                "or remove one of the runs."
            )
        seen[key] = path


# --------------------------------------------------------------------------- columns

# MNLI's dev splits as the papers' tables name their columns.
SPLIT_COLUMNS = {"validation_matched": "m", "validation_mismatched": "mm"}
# Tasks scored by both (MRPC, QQP): the papers give both, not their mean (`combined_score`).
BOTH_METRICS = (("acc", "accuracy", "accuracy"), ("f1", "f1", "F1"))
QA_METRICS = (("em", "exact_match", "EM"), ("f1", "f1", "F1"))


def _split_prefix(task: GlueTask, split: str) -> str:
    # kdexp.metrics.eval_prefix, restated: importing kdexp.metrics imports torch, which a report does not need.
    return "val" if split == task.eval_splits[0] else "val_" + split.removeprefix("validation_")


def _metric_words(metric: str) -> str:
    return metric.replace("_", " ")


def task_columns(task: str) -> list[Column]:
    """The columns a task can have: one per dev split for MNLI (m, mm), accuracy and F1 for MRPC and
    QQP, the main metric for every other task (a user's own task: the main metric its runs name)."""
    glue = TASKS.get(task)
    if glue is None:
        return [Column(task, task, None, task)]
    if len(glue.eval_splits) > 1:
        return [
            Column(
                f"{task}-{SPLIT_COLUMNS.get(split, split)}",
                task,
                f"{_split_prefix(glue, split)}/{glue.main_metric}",
                f"{task}-{SPLIT_COLUMNS.get(split, split)} ({_metric_words(glue.main_metric)})",
            )
            for split in glue.eval_splits
        ]
    if glue.family == EXTRACTIVE_QA:  # SQuAD: exact match and F1, as the papers give them
        return [
            Column(f"{task}-{short}", task, f"val/{metric}", f"{task} ({title})") for short, metric, title in QA_METRICS
        ]
    if all(metric in glue.metrics for _, metric, _ in BOTH_METRICS):
        return [
            Column(f"{task}-{short}", task, f"val/{metric}", f"{task} ({title})")
            for short, metric, title in BOTH_METRICS
        ]
    return [Column(task, task, None, f"{task} ({_metric_words(glue.main_metric)})")]


def _measures_main_metric(column: Column) -> bool:
    """The column a published number given for the task alone compares with (MNLI: matched)."""
    glue = TASKS.get(column.task)
    return column.metric is None or (glue is not None and column.metric == f"val/{glue.main_metric}")


def _main_column(task: str) -> Column:
    glue = TASKS.get(task)
    return Column(task, task, None, f"{task} ({_metric_words(glue.main_metric)})" if glue else task)


def table_columns(results: list[dict[str, Any]]) -> list[Column]:
    """The columns with a score in some run: tasks in GLUE order, then the users' own tasks.

    A task's second column (MNLI-mm, F1) shows when some run wrote its metric; a task none of whose
    columns a run wrote (an older run) gets a column for the main metric instead.
    """
    present = {r["task"] for r in results}
    tasks = [t for t in TASKS if t in present] + sorted(present - set(TASKS))
    columns = []
    for task in tasks:
        runs = [r for r in results if r["task"] == task]
        candidates = task_columns(task)
        columns += [c for c in candidates if any(c.value(r["metrics"], r["main_metric"]) is not None for r in runs)]
        if any(all(c.value(r["metrics"], r["main_metric"]) is None for c in candidates) for r in runs):
            columns.append(_main_column(task))
    return columns


def _columns_of(task: str, columns: list[Column]) -> list[Column]:
    return [c for c in columns if c.task == task]


# --------------------------------------------------------------------------- the table


def _cell(scores: Mapping[ScoreKey, float]) -> Cell:
    """The cell of scores (fractions, keyed by teacher and seed), ×100."""
    keyed = tuple((key, 100.0 * scores[key]) for key in sorted(scores, key=_key_order))
    values = [v for _, v in keyed]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(statistics.fmean(values), std, len(values), keyed)


def teacher_rows(results: list[dict[str, Any]], shown: set[str], columns: list[Column]) -> dict[str, dict[str, Cell]]:
    """One row per teacher: never a mean over different teachers (a teacher's score has no seed spread).

    Teachers are told apart by their `teacher.*` overrides; teachers that differ in nothing shown
    (e.g. a `data.*` override reaching the teacher by interpolation) get their cache key as label.
    """
    by_label: dict[str, dict[str, dict[str | None, float]]] = defaultdict(lambda: defaultdict(dict))  # by teacher key
    for r in results:
        if not r.get("teacher_metrics"):
            continue
        for column in _columns_of(r["task"], columns):
            score = column.value(r["teacher_metrics"], r["main_metric"])
            if score is not None and math.isfinite(score):
                by_label[teacher_label(r, shown)][column.key][r.get("teacher_key")] = score
    rows: dict[str, dict[str, Cell]] = defaultdict(dict)
    for label in sorted(by_label):
        for column in columns:
            scores = by_label[label].get(column.key, {})
            for key, score in sorted(scores.items(), key=lambda item: str(item[0])):
                rows[label if len(scores) == 1 else f"{label} [{key}]"][column.key] = _cell({(key, 0): score})
    return dict(rows)


def student_rows(results: list[dict[str, Any]], shown: set[str], columns: list[Column]) -> dict[str, dict[str, Cell]]:
    """Row label -> column key -> the cell of its runs' scores (one per teacher and seed)."""
    scores: dict[str, dict[str, dict[ScoreKey, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        for column in _columns_of(r["task"], columns):
            score = column.value(r["metrics"], r["main_metric"])
            if score is not None:
                scores[row_label(r, shown)][column.key][(r.get("teacher_key"), r["seed"])] = score
    return {
        label: {c.key: _cell(scores[label][c.key]) for c in columns if c.key in scores[label]}
        for label in sorted(scores)
    }


def build_table(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Column keys (tasks in GLUE order; MNLI, QQP and MRPC with two) and rows: row label -> column key -> cell."""
    columns = table_columns(results)
    return [c.key for c in columns], _rows(results, columns)


def _rows(results: list[dict[str, Any]], columns: list[Column]) -> dict[str, dict[str, Cell]]:
    shown = varying_overrides(results)
    return {**teacher_rows(results, shown, columns), **student_rows(results, shown, columns)}


SELECTED_MARK = " [selected on dev]"


def _task_score(cells: Mapping[str, Cell], columns: list[Column]) -> float | None:
    """A row's score on a task: the mean of its columns' means (QQP: of accuracy and F1), None without one."""
    means = [cells[c.key].mean for c in columns if c.key in cells]
    return statistics.fmean(means) if means else None


def select_on_dev(
    results: list[dict[str, Any]], columns: list[Column], rows: dict[str, dict[str, Cell]]
) -> tuple[dict[str, dict[str, Cell]], str]:
    """Per method and task, the grid cell (row) with the best mean dev score: the DBKD paper's protocol.

    A method with several rows (a sweep over its options) becomes one row marked as selected;
    the section returned lists every cell it chose from. Methods with one row are unchanged. A
    task with two columns (MNLI m/mm, QQP acc/F1) is chosen on the mean of both and keeps both
    from the one row chosen.
    """
    shown = varying_overrides(results)
    method_of = {row_label(r, shown): r["method"] for r in results}
    grids: dict[str, list[str]] = defaultdict(list)
    for label in rows:
        if label in method_of:
            grids[method_of[label]].append(label)
    selected: dict[str, dict[str, Cell]] = {}
    lines = []
    for label, cells in rows.items():
        method = method_of.get(label)
        if method is None or len(grids[method]) == 1:
            selected[label] = cells
            continue
        if method + SELECTED_MARK in selected:
            continue
        chosen: dict[str, Cell] = {}
        for task in dict.fromkeys(c.task for c in columns):
            task_columns_here = _columns_of(task, columns)
            candidates = {
                g: score for g in grids[method] if (score := _task_score(rows[g], task_columns_here)) is not None
            }
            if not candidates:
                continue
            best = max(candidates, key=lambda g: candidates[g])
            chosen.update({c.key: rows[best][c.key] for c in task_columns_here if c.key in rows[best]})
            listed = ", ".join(f"{g}: {score:.1f}" for g, score in candidates.items())
            lines.append(f"- {method}, {task}: chose {best} from {listed}")
        selected[method + SELECTED_MARK] = chosen
    section = (
        (
            "\nSelected on dev (per method and task, the grid cell with the best mean dev score; the "
            "score shown is that cell's, so it is not a held-out score):\n" + "\n".join(lines) + "\n"
        )
        if lines
        else ""
    )
    return selected, section


def student_labels(rows: Mapping[str, Any]) -> list[str]:
    return [label for label in rows if not is_teacher_row(label)]


def check_baseline(baseline: str, rows: Mapping[str, Any]) -> None:
    """Refuse a baseline that is no method row of the table, in one line listing the rows."""
    if baseline not in student_labels(rows):
        names = ", ".join(f"'{label}'" for label in student_labels(rows))
        raise UnknownBaseline(f"--baseline '{baseline}' is not a row of this table; its rows: {names}")


def paired_difference(cell: Cell, baseline: Cell) -> Difference:
    """`cell` − `baseline` over the runs both have (same teacher and seed)."""
    ours, theirs = dict(cell.scores), dict(baseline.scores)
    shared = sorted(ours.keys() & theirs.keys(), key=_key_order)
    return difference_statistics([ours[key] - theirs[key] for key in shared])


def compare_with_baseline(rows: dict[str, dict[str, Cell]], baseline: str) -> dict[str, dict[str, Difference]]:
    """Every other method row's paired difference from the baseline row, per column both have."""
    check_baseline(baseline, rows)
    reference = rows[baseline]
    return {
        label: {key: paired_difference(cell, reference[key]) for key, cell in cells.items() if key in reference}
        for label, cells in rows.items()
        if label != baseline and not is_teacher_row(label)
    }


def make_table(results: list[dict[str, Any]], select_on: str | None = None, baseline: str | None = None) -> Table:
    """The table of usable results: columns, rows (selected on dev with `select_on="dev"`) and, with
    a `baseline` row, every other row's paired difference from it."""
    columns = table_columns(results)
    rows = _rows(results, columns)
    selection = ""
    if select_on == "dev":
        rows, selection = select_on_dev(results, columns, rows)
    differences = compare_with_baseline(rows, baseline) if baseline is not None else {}
    return Table(columns, rows, selection, baseline, differences)


# --------------------------------------------------------------------------- for other programs (wandb)


def _cell_record(cell: Cell, column: Column, main_metric: str) -> dict[str, Any]:
    low, high = cell.ci or (None, None)
    return {
        "task": column.task,
        "metric": column.metric or f"val/{main_metric}",
        "title": column.title,
        "n": cell.n,
        "mean": cell.mean,
        "std": cell.std,
        "ci_low": low,
        "ci_high": high,
    }


def table_records(
    results: Iterable[Mapping[str, Any]], baseline: str | None = None, select_on: str | None = None
) -> list[dict[str, Any]]:
    """The report's table as plain dicts (JSON-ready: numbers, strings, None), to log it elsewhere (wandb).

    `results`: the contents of results.json files (`load_results(...).values()`). One dict per row,
    in the table's order: `{"row": label, "teacher": bool, "cells": {column key: stats}}`, where
    stats holds `task`, `metric` (its key in results.json `metrics`), `title`, and, ×100 as in the
    table, `n`, `mean`, `std`, `ci_low`, `ci_high` (the 95% Student-t interval of the mean; None
    for one seed). With a `baseline` row, every other method row's stats add `diff`, `diff_ci_low`,
    `diff_ci_high`, `p_permutation`, `p_t`, `n_pairs` and `significant` (the interval excludes 0),
    as `kdexp-report --baseline` computes them. A damaged result raises DataError; an unknown
    baseline, UnknownBaseline (both KdexpError).
    """
    results = list(results)
    for index, result in enumerate(results):
        problem = result_problem(result)
        if problem:
            raise DataError(f"result {index} of {len(results)}: {problem}")
    table = make_table(cast(list[dict[str, Any]], results), select_on, baseline)  # result_problem passes dicts only
    main_metric = {r["task"]: r["main_metric"] for r in results}
    records = []
    for label, cells in table.rows.items():
        stats = {}
        for column in table.columns:
            if column.key in cells:
                stats[column.key] = _cell_record(cells[column.key], column, main_metric[column.task])
                difference = table.differences.get(label, {}).get(column.key)
                if difference is not None:
                    stats[column.key].update(difference.as_dict())
        records.append({"row": label, "teacher": is_teacher_row(label), "cells": stats})
    return records


# --------------------------------------------------------------------------- Markdown and CSV


def markdown_cell(cell: Cell, teacher: bool = False, mark: bool = False) -> str:
    """`76.7 ± 0.9 [75.6, 77.8] n=3` (mean ± std [95% CI] n seeds), `†` after the std when marked;
    one seed: `80.0 n=1`; a teacher (no seeds): its score alone."""
    if teacher:
        return f"{cell.mean:.1f}"
    text = cell.format() + (DAGGER if mark else "")
    if cell.ci is not None:
        text += f" [{cell.ci[0]:.1f}, {cell.ci[1]:.1f}]"
    return f"{text} n={cell.n}"


def to_markdown(table: Table, runs: int, with_average: bool = False) -> str:
    averages = average_column(table.keys, table.rows, table.task_of) if with_average else {}
    marks = table.marks()
    header = (
        "| method | " + " | ".join(c.title for c in table.columns) + (f" | {AVERAGE}" if with_average else "") + " |"
    )
    lines = [header, "|---" * (len(table.columns) + 1 + with_average) + "|"]
    for label, cells in table.rows.items():
        values = [
            markdown_cell(cells[k], is_teacher_row(label), k in marks.get(label, set())) if k in cells else "–"
            for k in table.keys
        ]
        if with_average:
            values.append(f"{averages[label]:.1f}" if label in averages else "–")
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    seeds = sorted({c.n for label, cells in table.rows.items() if not is_teacher_row(label) for c in cells.values()})
    lines.append("")
    lines.append(
        f"Dev-set scores ×100: mean ± std over seeds, [95% confidence interval of the mean] (Student t), "
        f"n seeds (n = {', '.join(map(str, seeds))}); {runs} runs. The teacher rows are the fine-tuned "
        "teachers on the same dev data."
        + (
            f" {AVERAGE}: the mean over tasks, a task with two columns counting once (their mean)."
            if with_average
            else ""
        )
        + (
            f" {DAGGER}: the 95% CI of the paired difference from {table.baseline} excludes 0 (below)."
            if table.baseline is not None
            else ""
        )
    )
    return "\n".join(lines) + "\n"


def difference_text(difference: Difference | None) -> str:
    """`+4.0† [+1.2, +6.8] p_perm=0.25 p_t=0.021 n=3`, or what is missing for a test."""
    if difference is None or difference.mean is None:
        return "– (no shared seed)" if difference is not None else "–"
    if difference.ci is None:
        return f"{difference.mean:+.1f} (1 shared seed: no CI, no test)"
    low, high = difference.ci
    return (
        f"{difference.mean:+.1f}{DAGGER if difference.significant else ''} [{low:+.1f}, {high:+.1f}] "
        f"p_perm={difference.p_permutation:.3g} p_t={difference.p_t:.3g} n={difference.n_pairs}"
    )


def baseline_section(table: Table) -> str:
    """The paired differences of every method row from the baseline row, as a Markdown table."""
    if table.baseline is None:
        return ""
    lines = [
        f"\nPaired differences from {table.baseline} (row − {table.baseline}, ×100, over the seeds both ran: "
        "same task, teacher and seed): mean difference [95% CI, paired t], two-sided p-values of the exact "
        "sign-flip permutation test (p_perm, never below 2/2^n: 0.25 for 3 seeds) and of the paired t test "
        f"(p_t), n pairs. {DAGGER}: the CI excludes 0.\n",
        "| method | " + " | ".join(c.title for c in table.columns) + " |",
        "|---" * (len(table.columns) + 1) + "|",
    ]
    for label, by_column in table.differences.items():
        lines.append(f"| {label} | " + " | ".join(difference_text(by_column.get(k)) for k in table.keys) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: str = ".2f") -> str:
    return "" if value is None else format(value, digits)


STAT_COLUMNS = ("mean", "std", "n", "ci_low", "ci_high")
DIFFERENCE_COLUMNS = ("diff", "diff_ci_low", "diff_ci_high", "p_permutation", "p_t", "n_pairs")


def _cell_fields(cell: Cell | None) -> list[Any]:
    if cell is None:
        return ["", "", 0, "", ""]
    low, high = cell.ci or (None, None)
    return [f"{cell.mean:.2f}", f"{cell.std:.2f}", cell.n, _number(low), _number(high)]


def _difference_fields(difference: Difference | None) -> list[Any]:
    if difference is None:
        return ["", "", "", "", "", ""]
    low, high = difference.ci or (None, None)
    return [
        _number(difference.mean),
        _number(low),
        _number(high),
        _number(difference.p_permutation, ".4g"),
        _number(difference.p_t, ".4g"),
        difference.n_pairs,
    ]


def write_csv(path: Path, table: Table) -> None:
    """Per column: mean, std, n, ci_low, ci_high; with a baseline also diff, diff_ci_low, diff_ci_high,
    p_permutation, p_t, n_pairs (empty for the baseline and teacher rows) and the baseline's name."""
    names = STAT_COLUMNS + (DIFFERENCE_COLUMNS if table.baseline is not None else ())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["method"]
            + [f"{k}_{name}" for k in table.keys for name in names]
            + (["baseline"] if table.baseline is not None else [])
        )
        for label, cells in table.rows.items():
            row: list[Any] = [label]
            for key in table.keys:
                row += _cell_fields(cells.get(key))
                if table.baseline is not None:
                    row += _difference_fields(table.differences.get(label, {}).get(key))
            writer.writerow(row + ([table.baseline] if table.baseline is not None else []))


def shown_path(run: Path, folders: tuple[Path, ...]) -> str:
    """Relative to the folder given, when one was given (with several, the path as found)."""
    if len(folders) == 1 and run != folders[0]:
        return str(run.relative_to(folders[0]))
    return str(run)


def failure_note(run: Path) -> str:
    """` (failed: <its one-line error>)` for a sweep job that recorded its failure, else nothing."""
    try:
        error = json.loads((run / FAILED_FILE).read_text(encoding="utf-8"))["error"]
    except (OSError, ValueError, KeyError, TypeError):  # no record, or one that cannot be read: the path alone
        return ""
    return f" (failed: {error})"


def unfinished_section(paths: list[str]) -> str:
    if not paths:
        return ""
    return "\nRuns without results.json (failed or unfinished):\n" + "".join(f"- {p}\n" for p in paths)


def damaged_section(lines: list[str]) -> str:
    if not lines:
        return ""
    return "\nresults.json files left out of the table (damaged):\n" + "".join(f"- {line}\n" for line in lines)


def environment_label(result: Mapping[str, Any]) -> str:
    """One line for what a run was made with (results.json `environment`, kdexp.environment)."""
    environment = result.get("environment")
    if not isinstance(environment, Mapping):
        return "not recorded (a results.json from before kdexp recorded it)"
    libraries = environment.get("libraries") or {}
    versions = ", ".join(f"{name} {version}" for name, version in sorted(libraries.items()) if version)
    return (
        f"code {environment.get('code_revision') or 'outside a git checkout'}; {versions}; "
        f"{environment.get('cpu')}, {environment.get('cpu_threads')} thread(s); {environment.get('devices')}, "
        f"{environment.get('precision')}"
    )


def environments_of(results: Mapping[Path, Mapping[str, Any]]) -> dict[str, int]:
    """How many runs each environment made, most runs first."""
    counts = Counter(environment_label(result) for result in results.values())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def environment_section(environments: Mapping[str, int]) -> str:
    """What the runs were made with; several environments are named as such, since the same config and
    seed give other numbers on other code, libraries or thread counts."""
    if len(environments) == 1:
        return f"\nAll runs: {next(iter(environments))}.\n"
    lines = "".join(f"- {count} run(s): {label}\n" for label, count in environments.items())
    return f"\nThe runs come from {len(environments)} environments:\n{lines}"


def found_no_span(metrics: Mapping[str, Any]) -> bool:
    """A SQuAD 2.0 model that found no answer span (HasAns F1 0) and left every unanswerable question
    unanswered (NoAns 1): its EM and F1 are the unanswerable share of the dev set, whatever else it learned."""
    return metrics.get("val/HasAns_f1") == 0 and metrics.get("val/NoAns_f1") == 1


def runs_without_spans(results: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per row (task: label), how many of its runs found no span, of how many; rows with none left out."""
    shown = varying_overrides(results)
    counts: dict[str, list[int]] = {}
    for result in results:
        if "val/HasAns_f1" not in result["metrics"]:
            continue
        row = counts.setdefault(f"{result['task']}: {row_label(result, shown)}", [0, 0])
        row[0] += found_no_span(result["metrics"])
        row[1] += 1
    return {row: (none, total) for row, (none, total) in sorted(counts.items()) if none}


def no_span_section(rows: Mapping[str, tuple[int, int]]) -> str:
    if not rows:
        return ""
    lines = "".join(f"- {row}: {none} of {total} run(s)\n" for row, (none, total) in rows.items())
    return (
        "\nRuns that found no answer span (HasAns F1 0) and left every unanswerable question unanswered: "
        f"their EM and F1 are the dev set's unanswerable share, the score of answering nothing:\n{lines}"
    )


def _at_floor(metrics: Mapping[str, Any], floor: Mapping[str, Any], key: str) -> bool:
    return key in metrics and float(metrics[key]) <= float(floor[key])


def runs_at_majority_floor(results: list[dict[str, Any]]) -> dict[str, tuple[int, int, str]]:
    """Per row (task: label), how many of its runs scored no better on dev than answering every row with the
    most frequent label (results.json `majority_metrics`), of how many, and that floor ×100; the teachers
    (each distinct `teacher_key` once) as the row `task: teacher`. Rows with none at the floor left out."""
    shown = varying_overrides(results)
    counts: dict[str, list[int]] = {}
    floors: dict[str, set[str]] = defaultdict(set)
    teachers_seen: set[str] = set()

    def count(row: str, at_floor: bool, floor_value: float) -> None:
        entry = counts.setdefault(row, [0, 0])
        entry[0] += at_floor
        entry[1] += 1
        floors[row].add(f"{100 * floor_value:.1f}")

    for result in results:
        floor = result.get("majority_metrics")
        key = f"val/{result['main_metric']}"
        if not floor or key not in floor:
            continue
        count(f"{result['task']}: {row_label(result, shown)}", _at_floor(result["metrics"], floor, key), floor[key])
        teacher_key = str(result.get("teacher_key"))
        if result.get("teacher_metrics") and teacher_key not in teachers_seen:
            teachers_seen.add(teacher_key)
            count(f"{result['task']}: teacher", _at_floor(result["teacher_metrics"], floor, key), floor[key])
    return {row: (low, total, " / ".join(sorted(floors[row]))) for row, (low, total) in sorted(counts.items()) if low}


def majority_floor_section(rows: Mapping[str, tuple[int, int, str]]) -> str:
    if not rows:
        return ""
    lines = "".join(
        f"- {row}: {low} of {total} {'teacher(s)' if row.endswith(': teacher') else 'run(s)'} "
        f"(most frequent label: {floor})\n"
        for row, (low, total, floor) in rows.items()
    )
    return (
        "\nRuns no better on dev than answering every row with its most frequent label: what they learned "
        f"does not show in the score, and a student of such a teacher learns from noise:\n{lines}"
    )


def write_report(
    *folders: Path,
    out: Path | None = None,
    layout: str = "plain",
    reference: Path | None = None,
    select_on: str | None = None,
    baseline: str | None = None,
) -> Report:
    """Write report.md, report.csv, report.tex and report.svg (in `out`, default the first folder);
    refuse duplicates first. `layout="paper"` adds the Avg column; `reference` puts published
    numbers beside ours; `baseline` (a row) adds every other row's paired difference from it."""
    runs = find_runs(*folders)
    results, damaged = read_results(runs.results)
    damaged_lines = [f"{path}: {problem}" for path, problem in damaged.items()]
    if not results:
        raise SystemExit(
            "\n".join(
                damaged_lines
                + [
                    f"No usable results.json under {', '.join(map(str, folders))} ({len(damaged)} damaged, {len(runs.unfinished)} "
                    "failed or unfinished runs): point kdexp-report at a run or sweep folder."
                ]
            )
        )
    refuse_duplicates(results)
    all_results = list(results.values())
    table = make_table(all_results, select_on, baseline)
    unfinished = [shown_path(run, folders) + failure_note(run) for run in runs.unfinished]
    with_average = layout == "paper"
    markdown = to_markdown(table, len(results), with_average) + table.selection + baseline_section(table)
    if reference is not None:
        aliases = {c.task: c.key for c in table.columns if _measures_main_metric(c)}
        markdown += reference_markdown(table.keys, table.rows, *load_reference(reference), aliases=aliases)
    without_spans = runs_without_spans(all_results)
    markdown += no_span_section(without_spans)
    at_floor = runs_at_majority_floor(all_results)
    markdown += majority_floor_section(at_floor)
    markdown += unfinished_section(unfinished)
    environments = environments_of(results)
    markdown += environment_section(environments)
    markdown += damaged_section([f"{shown_path(path, folders)}: {problem}" for path, problem in damaged.items()])
    out = out or folders[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    write_csv(out / "report.csv", table)
    note = (
        (
            f"{DAGGER}: the 95% CI of the paired difference from {table.baseline} (same task, teacher and seed) "
            "excludes 0"
        )
        if table.baseline is not None
        else ""
    )
    (out / "report.tex").write_text(
        to_latex(
            table.keys,
            [c.title for c in table.columns],
            table.rows,
            with_average,
            task_of=table.task_of,
            marks=table.marks(),
            note=note,
        )
    )
    title = "dev scores ×100, mean ± std over seeds; dashed: teacher"
    (out / "report.svg").write_text(to_svg(table.keys, table.rows, title))
    figures = write_plots(
        out,
        table.keys,
        table.rows,
        all_results,
        varying_overrides(all_results),
        row_label,
        title,
        line_tasks=table.tasks,
    )
    unanswered = sum(none for none, _ in without_spans.values())
    students_at_floor = sum(low for row, (low, _, _) in at_floor.items() if not row.endswith(": teacher"))
    teachers_at_floor = sum(low for row, (low, _, _) in at_floor.items() if row.endswith(": teacher"))
    return Report(
        markdown,
        unfinished,
        figures,
        damaged_lines,
        len(environments),
        unanswered,
        students_at_floor,
        teachers_at_floor,
    )


def report(
    *folders: Path,
    out: Path | None = None,
    layout: str = "plain",
    reference: Path | None = None,
    select_on: str | None = None,
    baseline: str | None = None,
) -> str:
    """The markdown of `write_report`."""
    return write_report(
        *folders, out=out, layout=layout, reference=reference, select_on=select_on, baseline=baseline
    ).markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdexp-report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders",
        type=Path,
        nargs="+",
        metavar="folder",
        help="a sweep folder (outputs/multirun/<date>/<time>) or any folder of runs; several make one table",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where report.md and report.csv go (default: the first folder)"
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="exit with status 0 even if some runs have no results.json or a damaged one (they are still listed)",
    )
    parser.add_argument(
        "--layout",
        choices=("plain", "paper"),
        default="plain",
        help="paper: an Avg column over the tasks (the papers' tables)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a YAML file of published numbers (source + values) to show beside ours",
    )
    parser.add_argument(
        "--format",
        choices=("markdown", "csv", "latex"),
        default="markdown",
        help="what to print (all three files are written either way)",
    )
    parser.add_argument(
        "--select-on",
        choices=("dev",),
        default=None,
        help="dev: per method and task, keep the grid cell (option values) with the best mean dev score",
    )
    parser.add_argument(
        "--baseline",
        metavar="METHOD",
        default=None,
        help="a row of the table (as the table names it, e.g. finetune): every other row gets its "
        "paired difference from it over the seeds both ran, with a 95%% CI and p-values; † "
        "marks a CI that excludes 0",
    )
    parser.add_argument(
        "--reference-template",
        type=Path,
        default=None,
        help="write an empty reference file for this table's tasks and methods, then stop",
    )
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise SystemExit(f"kdexp-report: '{folder}' is not a folder.")
    if args.reference_template is not None:
        results = load_results(find_runs(*args.folders).results)
        keys, rows = build_table(list(results.values()))
        reference_template(args.reference_template, keys, student_labels(rows))
        print(f"{args.reference_template}: fill in the source and the values you copy from it")
        return
    try:
        written = write_report(
            *args.folders,
            out=args.out,
            layout=args.layout,
            reference=args.reference,
            select_on=args.select_on,
            baseline=args.baseline,
        )
    except UnknownBaseline as err:
        sys.stderr.write(f"kdexp-report: {err}\n")
        raise SystemExit(2) from None
    except KdexpError as err:
        raise SystemExit(f"kdexp-report: error: {err}") from None
    out = args.out or args.folders[0]
    if not matplotlib_available():
        sys.stderr.write("kdexp-report: PNG and PDF figures need matplotlib: pip install 'kdexp[plots]'\n")
    sys.stdout.write(
        {
            "markdown": written.markdown,
            "csv": (out / "report.csv").read_text() if args.format == "csv" else "",
            "latex": (out / "report.tex").read_text() if args.format == "latex" else "",
        }[args.format]
    )
    if written.environments > 1:
        sys.stderr.write(
            f"kdexp-report: the runs come from {written.environments} environments (code, libraries, CPU "
            "threads or devices; listed at the end of report.md): numbers may differ for that alone.\n"
        )
    if written.unanswered:
        sys.stderr.write(
            f"kdexp-report: {written.unanswered} SQuAD 2.0 run(s) found no answer span: their F1 is the "
            "unanswerable share (listed under the table).\n"
        )
    if written.students_at_floor or written.teachers_at_floor:
        sys.stderr.write(
            f"kdexp-report: {written.students_at_floor} run(s) and {written.teachers_at_floor} teacher(s) are no "
            "better on dev than the most frequent label (listed under the table).\n"
        )
    for line in written.damaged:
        sys.stderr.write(f"kdexp-report: {line}\n")
    if written.damaged:
        sys.stderr.write(
            f"kdexp-report: {len(written.damaged)} results.json file(s) left out of the table (damaged, "
            "as above); the table holds the other runs.\n"
        )
    if (written.unfinished or written.damaged) and not args.allow_missing:
        if written.unfinished:
            sys.stderr.write(
                f"kdexp-report: {len(written.unfinished)} run(s) without results.json (failed or "
                "unfinished), listed under the table; pass --allow-missing to accept a table without them.\n"
            )
        raise SystemExit(2)


if __name__ == "__main__":
    main()
