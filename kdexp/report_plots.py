"""The report's figures as PNG and PDF (matplotlib, the optional extra `kdexp[plots]`).

* `report.png` / `report.pdf`: per column of the table (a task; MNLI-m and -mm, QQP and MRPC
  accuracy and F1 apart), one bar per method row (mean over seeds) with its
  standard deviation as an error bar, each teacher as a dashed line; the axis spans the shown
  values, as the papers' tables differ by points.
* `report_<option>.png` / `.pdf` for every option swept over numbers (`method.alpha`,
  `method.top_k`, ...): per task, the score against the option's value, a line per method
  (with the other swept options in its label), error bars of one standard deviation; the
  task's main metric.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Protocol


class CellLike(Protocol):
    @property
    def mean(self) -> float: ...

    @property
    def std(self) -> float: ...

    @property
    def n(self) -> int: ...


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def bar_figure(tasks: list[str], rows: Mapping[str, Mapping[str, CellLike]], title: str = "") -> Any:
    plt = _pyplot()
    students = [label for label in rows if not label.startswith("teacher")]
    width = max(5.5, 1.2 + 0.55 * max(len(students), 2) * len(tasks))  # at least the title's width
    figure, axes = plt.subplots(1, len(tasks), figsize=(width, 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, task in zip(axes[0], tasks):
        shown = [(i, label, rows[label][task]) for i, label in enumerate(students) if task in rows[label]]
        for i, label, cell in shown:
            axis.bar(i, cell.mean, yerr=cell.std, color=colours(i % 10), capsize=3, label=label)
        teachers = [cells[task].mean for label, cells in rows.items() if label.startswith("teacher") and task in cells]
        for value in teachers:
            axis.axhline(value, color="black", linestyle="--", linewidth=1)
        values = [c.mean + s for _, _, c in shown for s in (c.std, -c.std)] + teachers
        if values:
            axis.set_ylim(min(values) - 2, max(values) + 2)
        axis.set_title(task)
        axis.set_xticks([])
    axes[0][0].set_ylabel("dev score ×100")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for axis in axes[0][1:]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    columns = max(1, min(len(labels), 3 if len(tasks) > 2 else 2))
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.02 + 0.045 * -(-len(labels) // columns), 1, 1))
    return figure


def numeric_sweeps(
    results: list[dict[str, Any]], shown: set[str], label_of: Any
) -> dict[str, dict[str, dict[str, list[tuple[float, float, float, int]]]]]:
    """option -> line label -> task -> [(value, mean, std, n)], for options swept over numbers.

    ``label_of(result, shown_keys)`` names a result's row; the line's label leaves the option out.
    """
    sweeps: dict[str, Any] = {}
    for option in sorted(shown):
        values = {_option_value(r, option) for r in results}
        if len(values) < 2 or any(_as_number(v) is None for v in values):
            continue
        scores: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        for r in results:
            value = _as_number(_option_value(r, option))
            assert value is not None  # options with a value that is not a number were skipped above
            scores[label_of(r, shown - {option})][r["task"]][value].append(
                100 * r["metrics"][f"val/{r['main_metric']}"]
            )
        sweeps[option] = {
            label: {
                task: [
                    (x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for x, v in sorted(points.items())
                ]
                for task, points in by_task.items()
            }
            for label, by_task in sorted(scores.items())
        }
    return sweeps


def _option_value(result: dict[str, Any], option: str) -> str | None:
    for override in result.get("overrides", []):
        key, _, value = override.partition("=")
        if key.lstrip("+~") == option:
            return value
    return None


def _as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def line_figure(
    option: str, tasks: list[str], lines: Mapping[str, Mapping[str, list[tuple[float, float, float, int]]]]
) -> Any:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(tasks), figsize=(1.5 + 3.5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for label, by_task in lines.items():
            points = by_task.get(task)
            if points:
                axis.errorbar(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    yerr=[p[2] for p in points],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        axis.set_title(task)
        axis.set_xlabel(option)
    axes[0][0].set_ylabel("dev score ×100")
    axes[0][-1].legend(fontsize=8, frameon=False)
    figure.tight_layout()
    return figure


def save(figure: Any, stem: Path) -> list[Path]:
    """`stem`.png and `stem`.pdf."""
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]  # names may hold dots
    figure.savefig(paths[0], dpi=150)
    figure.savefig(paths[1])
    _pyplot().close(figure)
    return paths


def write_plots(
    out: Path,
    tasks: list[str],
    rows: Mapping[str, Mapping[str, CellLike]],
    results: list[dict[str, Any]],
    shown: set[str],
    label_of: Any,
    title: str = "",
    line_tasks: list[str] | None = None,
) -> list[Path]:
    """Every figure of the report (empty when matplotlib is not installed): bars per column of the
    table (`tasks`: its column keys), lines per task (`line_tasks`, default `tasks`; main metric)."""
    if not matplotlib_available():
        return []
    written = save(bar_figure(tasks, rows, title), out / "report")
    for option, lines in numeric_sweeps(results, shown, label_of).items():
        swept_tasks = [t for t in (line_tasks or tasks) if any(t in by_task for by_task in lines.values())]
        written += save(line_figure(option, swept_tasks, lines), out / f"report_{option}")
    return written
