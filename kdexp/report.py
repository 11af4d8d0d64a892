"""`kdexp-report <sweep folder>`: the paper-style table of a sweep.

Reads every `results.json` under the folder and writes `report.md` and `report.csv` there:
tasks as columns (each task's main GLUE metric, ×100), methods as rows, mean ± std over
seeds, the teacher's row first. Runs that differ in other overrides (e.g. `method.alpha`)
get rows of their own.
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

GROUPING_KEYS_IGNORED = ("task", "seed", "method", "hydra.", "data.glue_dir", "cache_dir", "logger")


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    n: int

    def format(self) -> str:
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"


def load_results(folder: Path) -> list[dict[str, Any]]:
    results = []
    for path in sorted(folder.rglob("results.json")):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err}); remove or re-run that run.") from None
    return results


def _override_dict(result: dict[str, Any]) -> dict[str, str]:
    pairs = (o.split("=", 1) for o in result.get("overrides", []) if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if not k.lstrip("+~").startswith(GROUPING_KEYS_IGNORED)}


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


def _cell(values: list[float]) -> Cell:
    values = [100.0 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(statistics.fmean(values), std, len(values))


def build_table(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Columns (tasks in GLUE order) and rows: row label -> task -> cell."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[str, dict[str, float]] = defaultdict(dict)
    shown = varying_overrides(results)
    for r in results:
        metric = f"val/{r['main_metric']}"
        scores[row_label(r, shown)][r["task"]].append(r["metrics"][metric])
        if r.get("teacher_metrics"):
            teachers[r["task"]][r["teacher_key"]] = r["teacher_metrics"][metric]
    rows: dict[str, dict[str, Cell]] = {}
    if teachers:
        rows["teacher"] = {t: _cell(list(teachers[t].values())) for t in tasks if teachers[t]}
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
    seeds = sorted({c.n for cells in rows.values() for c in cells.values()})
    lines.append("")
    lines.append(f"Dev-set scores ×100, mean ± std over seeds (n = {', '.join(map(str, seeds))}); {runs} runs. "
                 "The teacher row is the fine-tuned teacher on the same dev data.")
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


def report(folder: Path) -> str:
    results = load_results(folder)
    if not results:
        raise SystemExit(f"No results.json under {folder}: point kdexp-report at a run or sweep folder.")
    tasks, rows = build_table(results)
    markdown = to_markdown(tasks, rows, len(results))
    (folder / "report.md").write_text(markdown)
    write_csv(folder / "report.csv", tasks, rows)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdexp-report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder (outputs/multirun/<date>/<time>) or any folder of runs")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"kdexp-report: '{args.folder}' is not a folder.")
    sys.stdout.write(report(args.folder))


if __name__ == "__main__":
    main()
