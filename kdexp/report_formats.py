"""The report's table in other forms: LaTeX (booktabs), an SVG bar chart, published numbers beside ours.

A table is `tasks` (its column keys: a task, or a task's metric such as `mnli-mm` or `qqp-f1`)
and `rows` (label -> column key -> Cell with mean, std, n), as `kdexp.report.build_table` makes
it. Pure functions of it; no plotting library.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from kdexp.errors import DataError

AVERAGE = "Avg"
DAGGER = "†"  # the paired difference from the baseline row has a 95% CI that excludes 0


class CellLike(Protocol):
    @property
    def mean(self) -> float: ...

    @property
    def std(self) -> float: ...

    @property
    def n(self) -> int: ...


def average_column(
    tasks: list[str], rows: Mapping[str, Mapping[str, CellLike]], task_of: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Each row's mean over the tasks, for the rows that have every column (the papers' Avg column).

    `task_of` maps a column to its task: a task with two columns (MNLI m/mm, QQP accuracy/F1)
    counts once, as the mean of its columns. Without it every column is a task.
    """
    groups: dict[str, list[str]] = {}
    for column in tasks:
        groups.setdefault((task_of or {}).get(column, column), []).append(column)

    def task_mean(cells: Mapping[str, CellLike], columns: list[str]) -> float:
        return sum(cells[c].mean for c in columns) / len(columns)

    return {
        label: sum(task_mean(cells, columns) for columns in groups.values()) / len(groups)
        for label, cells in rows.items()
        if tasks and all(t in cells for t in tasks)
    }


def _best_of(scored: Mapping[str, float]) -> set[str]:
    """The labels whose value, as printed (one decimal), is the best: a tie in print is bold for all."""
    if not scored:
        return set()
    top = max(round(value, 1) for value in scored.values())
    return {label for label, value in scored.items() if round(value, 1) == top}


def _best(tasks: list[str], rows: Mapping[str, Mapping[str, CellLike]]) -> dict[str, set[str]]:
    """The labels of the best student rows per task (teacher rows excluded)."""
    return {
        task: _best_of(
            {
                label: cells[task].mean
                for label, cells in rows.items()
                if task in cells and not label.startswith("teacher")
            }
        )
        for task in tasks
    }


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text.replace("±", r"$\pm$")


def to_latex(
    tasks: list[str],
    titles: list[str],
    rows: Mapping[str, Mapping[str, CellLike]],
    with_average: bool,
    task_of: Mapping[str, str] | None = None,
    marks: Mapping[str, set[str]] | None = None,
    note: str = "",
) -> str:
    """A booktabs table; the best student value of each column in bold; `marks` (row -> columns) get a
    dagger (the difference from the baseline is significant), explained by `note` in a comment below."""
    best = _best(tasks, rows)
    averages = average_column(tasks, rows, task_of) if with_average else {}
    best_average = _best_of({k: v for k, v in averages.items() if not k.startswith("teacher")})
    columns = "l" + "c" * (len(tasks) + bool(with_average))
    header = " & ".join(["Method", *(_latex_escape(t) for t in titles), *([AVERAGE] if with_average else [])])
    lines = [rf"\begin{{tabular}}{{{columns}}}", r"\toprule", header + r" \\", r"\midrule"]
    for label, cells in rows.items():
        values = []
        for task in tasks:
            text = _latex_escape(_format(cells[task])) if task in cells else "--"
            if task in (marks or {}).get(label, set()):
                text += r"$^\dagger$"
            values.append(rf"\textbf{{{text}}}" if label in best.get(task, set()) else text)
        if with_average:
            text = f"{averages[label]:.1f}" if label in averages else "--"
            values.append(rf"\textbf{{{text}}}" if label in best_average else text)
        lines.append(" & ".join([_latex_escape(label), *values]) + r" \\")
        if label.startswith("teacher") and not any(
            k.startswith("teacher") for k in list(rows)[list(rows).index(label) + 1 :]
        ):
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if note:
        lines.append("% " + note.replace(DAGGER, r"$^\dagger$"))
    return "\n".join(lines) + "\n"


def _format(cell: CellLike) -> str:
    return f"{cell.mean:.1f}" if cell.n == 1 else f"{cell.mean:.1f} ± {cell.std:.1f}"


COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def to_svg(tasks: list[str], rows: Mapping[str, Mapping[str, CellLike]], title: str = "") -> str:
    """Per task, one bar per row (mean) with its standard deviation as an error bar; teacher rows as
    a dashed line. The vertical axis spans the shown values (not from 0), as the papers' tables differ
    by points, not by tens of points."""
    students = [label for label in rows if not label.startswith("teacher")]
    values = [c.mean + s for cells in rows.values() for c in cells.values() for s in (c.std, -c.std)]
    low, high = min(values) - 2, max(values) + 2
    width, height, left, top, bottom = 120 + 60 * len(tasks) * max(len(students), 1), 360, 60, 40, 60
    group = (width - left - 20) / max(len(tasks), 1)
    bar = 0.8 * group / max(len(students), 1)

    def y(value: float) -> float:
        return round(top + (height - top - bottom) * (high - value) / (high - low), 2)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20 * len(students)}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
        f'<line x1="{left}" y1="{y(high)}" x2="{left}" y2="{y(low)}" stroke="black"/>',
        f'<text x="{left - 4}" y="{y(high) + 4}" text-anchor="end">{high:.0f}</text>',
        f'<text x="{left - 4}" y="{y(low) + 4}" text-anchor="end">{low:.0f}</text>',
    ]
    for t, task in enumerate(tasks):
        x0 = left + 10 + t * group
        parts.append(f'<text x="{x0 + 0.4 * group}" y="{height - bottom + 16}" text-anchor="middle">{task}</text>')
        for label, cells in rows.items():
            if label.startswith("teacher") and task in cells:
                parts.append(
                    f'<line data-row="{label}" data-task="{task}" x1="{x0}" x2="{x0 + 0.8 * group}" '
                    f'y1="{y(cells[task].mean)}" y2="{y(cells[task].mean)}" stroke="black" stroke-dasharray="4"/>'
                )
        for i, label in enumerate(students):
            cell = rows[label].get(task)
            if cell is None:
                continue
            x = round(x0 + i * bar, 2)
            parts.append(
                f'<rect data-row="{label}" data-task="{task}" x="{x}" y="{y(cell.mean)}" width="{round(bar * 0.9, 2)}" '
                f'height="{round(y(low) - y(cell.mean), 2)}" fill="{COLOURS[i % len(COLOURS)]}"/>'
            )
            middle = round(x + bar * 0.45, 2)
            parts.append(
                f'<line x1="{middle}" x2="{middle}" y1="{y(cell.mean + cell.std)}" y2="{y(cell.mean - cell.std)}" '
                'stroke="black"/>'
            )
    for i, label in enumerate(students):
        parts.append(
            f'<rect x="{left}" y="{height + 20 * i - 10}" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>'
            f'<text x="{left + 16}" y="{height + 20 * i}">{label}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


UNFILLED_SOURCE = "FILL IN"


def load_reference(path: Path) -> tuple[str, dict[str, dict[str, float]]]:
    """Published numbers: `source:` and `values: {task: {method: value or null}}` (×100, as in the table)."""
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: not a readable YAML reference file ({err}).") from None
    source = content.get("source")
    values = content.get("values") or {}
    if not source or not isinstance(values, dict):
        raise DataError(
            f"{path}: needs `source:` (where the numbers come from) and `values: {{task: {{method: value}}}}`."
        )
    published = {
        task: {m: float(v) for m, v in (methods or {}).items() if v is not None} for task, methods in values.items()
    }
    if str(source).startswith(UNFILLED_SOURCE) and any(published.values()):
        raise DataError(f"{path}: `source:` still reads '{UNFILLED_SOURCE}...': name the table the values come from.")
    return str(source), published


def reference_markdown(
    tasks: list[str],
    rows: Mapping[str, Mapping[str, CellLike]],
    source: str,
    reference: dict[str, dict[str, float]],
    aliases: Mapping[str, str] | None = None,
) -> str:
    """Ours beside the published value and the difference, for every (method, column) the file gives.

    The file names columns (`mnli-mm`, `qqp-f1`) or tasks; `aliases` maps a task to the column its
    published number compares with (`mnli` -> `mnli-m`). A task with two columns and no alias
    (QQP: accuracy or F1?) is named in a line asking for the column.
    """
    by_column = {key: values for key, values in reference.items() if key in tasks}
    for task, column in (aliases or {}).items():
        if task in reference and task not in tasks:
            by_column.setdefault(column, reference[task])
    unmatched = sorted(
        k
        for k, v in reference.items()
        if v and k not in tasks and k not in (aliases or {}) and any(t.startswith(f"{k}-") for t in tasks)
    )
    lines = [
        f"\nPublished numbers ({source}) beside ours:\n",
        "| method | task | ours | published | ours − published |",
        "|---|---|---|---|---|",
    ]
    found = False
    for task in tasks:
        for method, published in sorted(by_column.get(task, {}).items()):
            cell = rows.get(method, {}).get(task)
            if cell is None:
                continue
            found = True
            lines.append(f"| {method} | {task} | {_format(cell)} | {published:.1f} | {cell.mean - published:+.1f} |")
    asks = "".join(
        f"- `{k}` has two columns here: give its published numbers under "
        f"{' or '.join(t for t in tasks if t.startswith(f'{k}-'))}\n"
        for k in unmatched
    )
    if not found:
        return f"\nPublished numbers ({source}): none for these rows and tasks.\n" + asks
    return "\n".join(lines) + "\n" + asks


def reference_template(path: Path, tasks: list[str], methods: list[str]) -> None:
    """A reference file with empty values and a source to fill in (no number without its source)."""
    content: dict[str, Any] = {
        "source": f"{UNFILLED_SOURCE}: paper, table and page the values are copied from",
        "values": {task: {method: None for method in methods} for task in tasks},
    }
    path.write_text(yaml.safe_dump(content, sort_keys=False))
