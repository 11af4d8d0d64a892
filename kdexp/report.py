"""`kdexp-report <sweep folder>`: the paper-style table of a sweep.

Reads every `results.json` under the folder(s) and writes `report.md` and `report.csv` (in the
first folder, or `--out`): tasks as columns (each task's main GLUE metric, ×100), methods as
rows, mean ± std over seeds, one row per teacher first. Runs that differ in other overrides
(e.g. `method.alpha`) get rows of their own; overrides that cannot change a score (progress
bar, logging, workers) do not split rows. Several folders make one table, e.g. a method's
sweep next to the baselines' sweep run with the same settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdexp.tasks import TASKS

GROUPING_KEYS_IGNORED = (
    "task", "seed", "method", "hydra.", "data.glue_dir", "cache_dir", "logger", "logger.", "resume", "keep_checkpoints",
    # display, logging and loading only: they cannot change a score
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "data.num_workers", "data.eval_batch_size",
)


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    n: int

    def format(self) -> str:
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"


def load_results(*folders: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted({p.resolve() for folder in folders for p in folder.rglob("results.json")}):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err}); remove or re-run that run.") from None
    return results


def _ignored(key: str) -> bool:
    """`method` and `method.name` are the row itself, but `method.alpha` separates rows."""
    return any(key == k or key.startswith(k if k.endswith(".") else k + ".name") for k in GROUPING_KEYS_IGNORED)


def _override_dict(result: dict[str, Any]) -> dict[str, str]:
    pairs = ((k.lstrip("+~"), v) for k, v in (o.split("=", 1) for o in result.get("overrides", []) if "=" in o))
    return {k: v for k, v in pairs if not _ignored(k)}


def varying_overrides(results: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value is not the same in every run (what separates rows of one method)."""
    seen: dict[str, set[str | None]] = defaultdict(set)
    dicts = [_override_dict(r) for r in results]
    for key in {k for d in dicts for k in d}:
        for d in dicts:
            seen[key].add(d.get(key))
    return {k for k, values in seen.items() if len(values) > 1}


def row_label(result: dict[str, Any], shown: set[str]) -> str:
    """The method name plus the overrides that vary across the sweep (not task, seed, method)."""
    extra = [f"{k}={v}" for k, v in sorted(_override_dict(result).items()) if k in shown]
    return result["method"] + (f" ({', '.join(extra)})" if extra else "")


def teacher_label(result: dict[str, Any], shown: set[str]) -> str:
    """The label "teacher", plus the `teacher.*` overrides that vary across the sweep."""
    extra = [f"{k}={v}" for k, v in sorted(_override_dict(result).items()) if k in shown and k.startswith("teacher.")]
    return "teacher" + (f" ({', '.join(extra)})" if extra else "")


def teacher_rows(results: list[dict[str, Any]], shown: set[str], tasks: list[str]) -> dict[str, dict[str, Cell]]:
    """One row per teacher: never a mean over different teachers (a teacher's score has no seed spread).

    Teachers are told apart by their `teacher.*` overrides; teachers that differ in nothing shown
    (e.g. a `data.*` override reaching the teacher by interpolation) get their cache key as label.
    """
    by_label: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        if r.get("teacher_metrics"):
            by_label[teacher_label(r, shown)][r["task"]][r["teacher_key"]] = r["teacher_metrics"][f"val/{r['main_metric']}"]
    rows: dict[str, dict[str, Cell]] = defaultdict(dict)
    for label in sorted(by_label):
        for task in tasks:
            scores = by_label[label].get(task, {})
            for key, score in sorted(scores.items()):
                rows[label if len(scores) == 1 else f"{label} [{key}]"][task] = _cell([score])
    return dict(rows)


def _cell(values: list[float]) -> Cell:
    values = [100.0 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(statistics.fmean(values), std, len(values))


def build_table(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Columns (tasks in GLUE order) and rows: row label -> task -> cell."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    shown = varying_overrides(results)
    for r in results:
        scores[row_label(r, shown)][r["task"]].append(r["metrics"][f"val/{r['main_metric']}"])
    rows = teacher_rows(results, shown, tasks)
    for label in sorted(scores):
        rows[label] = {t: _cell(v) for t, v in scores[label].items()}
    return tasks, rows


def _column_title(task: str) -> str:
    spec = TASKS[task]
    return f"{task} ({spec.main_metric.replace('_', ' ')})"


def to_markdown(tasks: list[str], rows: dict[str, dict[str, Cell]], runs: int) -> str:
    header = "| method | " + " | ".join(_column_title(t) for t in tasks) + " |"
    lines = [header, "|---" * (len(tasks) + 1) + "|"]
    for label, cells in rows.items():
        values = [cells[t].format() if t in cells else "–" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    seeds = sorted({c.n for label, cells in rows.items() if not label.startswith("teacher") for c in cells.values()})
    lines.append("")
    lines.append(f"Dev-set scores ×100, mean ± std over seeds (n = {', '.join(map(str, seeds))}); {runs} runs. "
                 "The teacher rows are the fine-tuned teachers on the same dev data.")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, tasks: list[str], rows: dict[str, dict[str, Cell]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + [f"{t}_{k}" for t in tasks for k in ("mean", "std", "n")])
        for label, cells in rows.items():
            row: list[Any] = [label]
            for t in tasks:
                c = cells.get(t)
                row += [f"{c.mean:.2f}", f"{c.std:.2f}", c.n] if c else ["", "", 0]
            writer.writerow(row)


def report(*folders: Path, out: Path | None = None) -> str:
    results = load_results(*folders)
    if not results:
        raise SystemExit(f"No results.json under {', '.join(map(str, folders))}: point kdexp-report at a run or "
                         "sweep folder.")
    tasks, rows = build_table(results)
    markdown = to_markdown(tasks, rows, len(results))
    out = out or folders[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    write_csv(out / "report.csv", tasks, rows)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdexp-report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", metavar="folder",
                        help="a sweep folder (outputs/multirun/<date>/<time>) or any folder of runs; several make one table")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and report.csv go (default: the first folder)")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise SystemExit(f"kdexp-report: '{folder}' is not a folder.")
    sys.stdout.write(report(*args.folders, out=args.out))


if __name__ == "__main__":
    main()
