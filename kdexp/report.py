"""`kdexp-report <sweep folder>`: the paper-style table of a sweep.

Reads every `results.json` under the folder(s) and writes `report.md`, `report.csv`, `report.tex`
(booktabs, best value per column in bold), `report.svg` (bars with std error bars) and, with
matplotlib (`pip install 'kdexp[plots]'`), `report.png`/`.pdf` and a line plot per numeric option
swept (`report_method.alpha.png`, ...) in the first folder, or `--out`: tasks as columns (each task's main GLUE metric, ×100), methods as
rows, mean ± std over seeds, one row per teacher first. Runs that differ in other overrides
(e.g. `method.alpha`) get rows of their own; overrides that cannot change a score (progress
bar, logging, workers: `kdexp.config.NON_RESULT_KEYS`) do not split rows. Several folders make one table, e.g. a method's
sweep next to the baselines' sweep run with the same settings.

Nothing is hidden: run folders without `results.json` (failed or unfinished) are listed under
the table and make the exit status 2 unless `--allow-missing` is given, and two results of the
same experiment (same task, row, teacher and seed) are refused rather than averaged as seeds.
`--select-on dev` turns each method's grid (rows differing in its options) into one row: per task
the cell with the best mean dev score, listed under the table with the cells it was chosen from.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdexp.config import is_result_key
from kdexp.errors import KdexpError
from kdexp.report_formats import (
    AVERAGE,
    average_column,
    load_reference,
    reference_markdown,
    reference_template,
    to_latex,
    to_svg,
)
from kdexp.report_plots import matplotlib_available, write_plots
from kdexp.tasks import TASKS

RESULTS_FILE = "results.json"
# The column, the row's method and the seed themselves: never part of a row label.
TABLE_KEYS = ("task", "task.name", "seed", "method", "method.name")


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float
    n: int

    def format(self) -> str:
        if self.n == 1:
            return f"{self.mean:.1f}"
        return f"{self.mean:.1f} ± {self.std:.1f}"


@dataclass(frozen=True)
class Runs:
    results: list[Path]  # every results.json found
    unfinished: list[Path]  # run folders without one: failed or unfinished


@dataclass(frozen=True)
class Report:
    markdown: str
    unfinished: list[str]  # as listed under the table
    figures: list[Path]  # PNG and PDF files written (none without matplotlib)


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


def load_results(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    results = {}
    for path in paths:
        try:
            results[path] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}: not valid JSON ({err}); remove or re-run that run.") from None
    return results


def _splits_rows(key: str) -> bool:
    """`method.alpha` separates rows; the table's own keys and keys that cannot change a score do not."""
    return key not in TABLE_KEYS and is_result_key(key)


def _override_dict(result: dict[str, Any]) -> dict[str, str]:
    pairs = ((k.lstrip("+~"), v) for k, v in (o.split("=", 1) for o in result.get("overrides", []) if "=" in o))
    return {k: v for k, v in pairs if _splits_rows(k)}


def varying_overrides(results: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value is not the same in every run (what separates rows of one method)."""
    seen: dict[str, set[str | None]] = defaultdict(set)
    dicts = [_override_dict(r) for r in results]
    for key in {k for d in dicts for k in d}:
        for d in dicts:
            seen[key].add(d.get(key))
    return {k for k, values in seen.items() if len(values) > 1}


DEV_REWARD_MARK = " [reward on dev]"


def row_label(result: dict[str, Any], shown: set[str]) -> str:
    """The method name plus the overrides that vary across the sweep (not task, seed, method).

    A run whose method was steered by the dev set (knowledge selection with `reward.split=dev`)
    is marked: its dev score is not a held-out score.
    """
    extra = [f"{k}={v}" for k, v in sorted(_override_dict(result).items()) if k in shown]
    label = result["method"] + (f" ({', '.join(extra)})" if extra else "")
    if (result.get("method_info") or {}).get("reward_split") == "dev":
        label += DEV_REWARD_MARK
    return label


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


def refuse_duplicates(results: dict[Path, dict[str, Any]]) -> None:
    """Two results of one (task, row, teacher, seed) are one experiment run twice, not two seeds."""
    shown = varying_overrides(list(results.values()))
    seen: dict[tuple[Any, ...], Path] = {}
    for path, r in results.items():
        key = (r["task"], row_label(r, shown), r.get("teacher_key"), r["seed"])
        if key in seen:
            raise SystemExit(f"{seen[key]} and {path} are the same experiment ({key[0]}, {key[1]}, teacher "
                             f"{key[2]}, seed {key[3]}) run twice, not two seeds: pass only one of the folders, "
                             "or remove one of the runs.")
        seen[key] = path


def _cell(values: list[float]) -> Cell:
    values = [100.0 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(statistics.fmean(values), std, len(values))


def build_table(results: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Columns (tasks in GLUE order) and rows: row label -> task -> cell."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    tasks += sorted({r["task"] for r in results} - set(TASKS))  # the users' own tasks, after GLUE
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    shown = varying_overrides(results)
    for r in results:
        scores[row_label(r, shown)][r["task"]].append(r["metrics"][f"val/{r['main_metric']}"])
    rows = teacher_rows(results, shown, tasks)
    for label in sorted(scores):
        rows[label] = {t: _cell(v) for t, v in scores[label].items()}
    return tasks, rows


SELECTED_MARK = " [selected on dev]"


def select_on_dev(results: list[dict[str, Any]], tasks: list[str], rows: dict[str, dict[str, Cell]]
                  ) -> tuple[dict[str, dict[str, Cell]], str]:
    """Per method and task, the grid cell (row) with the best mean dev score: the DBKD paper's protocol.

    A method with several rows (a sweep over its options) becomes one row marked as selected;
    the section returned lists every cell it chose from. Methods with one row are unchanged.
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
        for task in tasks:
            candidates = {g: rows[g][task] for g in grids[method] if task in rows[g]}
            if not candidates:
                continue
            best = max(candidates, key=lambda g: candidates[g].mean)
            chosen[task] = candidates[best]
            listed = ", ".join(f"{g}: {c.mean:.1f}" for g, c in candidates.items())
            lines.append(f"- {method}, {task}: chose {best} from {listed}")
        selected[method + SELECTED_MARK] = chosen
    section = ("\nSelected on dev (per method and task, the grid cell with the best mean dev score; the "
               "score shown is that cell's, so it is not a held-out score):\n" + "\n".join(lines) + "\n") if lines else ""
    return selected, section


def _column_title(task: str) -> str:
    if task not in TASKS:
        return task  # a user's own task: its main metric is in its results
    return f"{task} ({TASKS[task].main_metric.replace('_', ' ')})"


def to_markdown(tasks: list[str], rows: dict[str, dict[str, Cell]], runs: int, with_average: bool = False) -> str:
    averages = average_column(tasks, rows) if with_average else {}
    header = "| method | " + " | ".join(_column_title(t) for t in tasks) + (f" | {AVERAGE}" if with_average else "") + " |"
    lines = [header, "|---" * (len(tasks) + 1 + with_average) + "|"]
    for label, cells in rows.items():
        values = [cells[t].format() if t in cells else "–" for t in tasks]
        if with_average:
            values.append(f"{averages[label]:.1f}" if label in averages else "–")
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


def shown_path(run: Path, folders: tuple[Path, ...]) -> str:
    """Relative to the folder given, when one was given (with several, the path as found)."""
    if len(folders) == 1 and run != folders[0]:
        return str(run.relative_to(folders[0]))
    return str(run)


def unfinished_section(paths: list[str]) -> str:
    if not paths:
        return ""
    return "\nRuns without results.json (failed or unfinished):\n" + "".join(f"- {p}\n" for p in paths)


def write_report(*folders: Path, out: Path | None = None, layout: str = "plain",
                 reference: Path | None = None, select_on: str | None = None) -> Report:
    """Write report.md, report.csv, report.tex and report.svg (in `out`, default the first folder);
    refuse duplicates first. `layout="paper"` adds the Avg column; `reference` puts published
    numbers beside ours."""
    runs = find_runs(*folders)
    results = load_results(runs.results)
    if not results:
        raise SystemExit(f"No results.json under {', '.join(map(str, folders))} ({len(runs.unfinished)} failed or "
                         "unfinished runs): point kdexp-report at a run or sweep folder.")
    refuse_duplicates(results)
    tasks, rows = build_table(list(results.values()))
    selection = ""
    if select_on == "dev":
        rows, selection = select_on_dev(list(results.values()), tasks, rows)
    unfinished = [shown_path(run, folders) for run in runs.unfinished]
    with_average = layout == "paper"
    markdown = to_markdown(tasks, rows, len(results), with_average) + selection
    if reference is not None:
        markdown += reference_markdown(tasks, rows, *load_reference(reference))
    markdown += unfinished_section(unfinished)
    out = out or folders[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    write_csv(out / "report.csv", tasks, rows)
    (out / "report.tex").write_text(to_latex(tasks, [_column_title(t) for t in tasks], rows, with_average))
    title = "dev scores ×100, mean ± std over seeds; dashed: teacher"
    (out / "report.svg").write_text(to_svg(tasks, rows, title))
    all_results = list(results.values())
    figures = write_plots(out, tasks, rows, all_results, varying_overrides(all_results), row_label, title)
    return Report(markdown, unfinished, figures)


def report(*folders: Path, out: Path | None = None, layout: str = "plain", reference: Path | None = None,
           select_on: str | None = None) -> str:
    """The markdown of `write_report`."""
    return write_report(*folders, out=out, layout=layout, reference=reference, select_on=select_on).markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdexp-report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", metavar="folder",
                        help="a sweep folder (outputs/multirun/<date>/<time>) or any folder of runs; several make one table")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and report.csv go (default: the first folder)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="exit with status 0 even if some runs have no results.json (they are still listed)")
    parser.add_argument("--layout", choices=("plain", "paper"), default="plain",
                        help="paper: an Avg column over the tasks (the papers' tables)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a YAML file of published numbers (source + values) to show beside ours")
    parser.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown",
                        help="what to print (all three files are written either way)")
    parser.add_argument("--select-on", choices=("dev",), default=None,
                        help="dev: per method and task, keep the grid cell (option values) with the best mean dev score")
    parser.add_argument("--reference-template", type=Path, default=None,
                        help="write an empty reference file for this table's tasks and methods, then stop")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise SystemExit(f"kdexp-report: '{folder}' is not a folder.")
    if args.reference_template is not None:
        results = load_results(find_runs(*args.folders).results)
        tasks, rows = build_table(list(results.values()))
        reference_template(args.reference_template, tasks, [r for r in rows if not r.startswith("teacher")])
        print(f"{args.reference_template}: fill in the source and the values you copy from it")
        return
    try:
        written = write_report(*args.folders, out=args.out, layout=args.layout, reference=args.reference,
                               select_on=args.select_on)
    except KdexpError as err:
        raise SystemExit(f"kdexp-report: error: {err}") from None
    out = args.out or args.folders[0]
    if not matplotlib_available():
        sys.stderr.write("kdexp-report: PNG and PDF figures need matplotlib: pip install 'kdexp[plots]'\n")
    sys.stdout.write({"markdown": written.markdown, "csv": (out / "report.csv").read_text() if args.format == "csv" else "",
                      "latex": (out / "report.tex").read_text() if args.format == "latex" else ""}[args.format])
    if written.unfinished and not args.allow_missing:
        sys.stderr.write(f"kdexp-report: {len(written.unfinished)} run(s) without results.json (failed or unfinished), "
                         "listed under the table; pass --allow-missing to accept a table without them.\n")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
