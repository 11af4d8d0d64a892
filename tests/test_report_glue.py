"""`kdexp-report` on damaged results.json files, and the papers' columns for MNLI, QQP and MRPC."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from kdexp.metrics import eval_prefix
from kdexp.report import main, report, table_records, write_report
from kdexp.tasks import TASKS

# How a run names MNLI's dev metrics (kdexp.metrics.eval_prefix): the report must read these names.
MATCHED = f"{eval_prefix(TASKS['mnli'], 'validation_matched')}/accuracy"
MISMATCHED = f"{eval_prefix(TASKS['mnli'], 'validation_mismatched')}/accuracy"


def write_run(
    folder: Path,
    task: str,
    method: str,
    seed: int,
    metrics: dict[str, float],
    teacher: dict[str, float] | None = None,
    main_metric: str | None = None,
) -> Path:
    run = folder / f"{task}_{method}_{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": task,
                "method": method,
                "seed": seed,
                "main_metric": main_metric or TASKS[task].main_metric,
                "metrics": metrics,
                "teacher_metrics": teacher or {},
                "teacher_key": f"{task}-teacher",
                "overrides": [f"task={task}", f"method={method}", f"seed={seed}"],
            }
        )
    )
    return run


def markdown_rows(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first table's column titles and rows (label -> cells)."""
    lines = [line for line in markdown.split("\n\n")[0].splitlines() if line.startswith("| ")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0][1:], {cells[0]: cells[1:] for cells in split[1:]}


@pytest.fixture
def no_figures(monkeypatch) -> None:
    """The PNG/PDF figures take most of a report's time and are tested in test_report.py."""
    monkeypatch.setattr("kdexp.report.write_plots", lambda *args, **kwargs: [])


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


# --------------------------------------------------------------------------- damaged results.json


def good_sweep(folder: Path) -> None:
    for seed, score in ((1, 0.80), (2, 0.84)):
        write_run(folder, "sst2", "finetune", seed, {"val/accuracy": score}, {"val/accuracy": 0.9})


def valid_result() -> dict:
    return {
        "task": "sst2",
        "method": "vanilla_kd",
        "seed": 1,
        "main_metric": "accuracy",
        "metrics": {"val/accuracy": 0.85},
        "teacher_metrics": {"val/accuracy": 0.9},
        "teacher_key": "sst2-teacher",
    }


def without(key: str) -> bytes:
    return json.dumps({k: v for k, v in valid_result().items() if k != key}).encode()


DAMAGED = {
    "binary": (b"\x80\x03}q\x00(X\x04\x00\x00\x00taskq", "binary data"),
    "not UTF-8": ('{"task": "sst2", "method": "vanilla_kd_é"}'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "truncated": (json.dumps(valid_result()).encode()[:-25], "truncated JSON"),
    "invalid JSON": (b'{"task": "sst2", "method": "vanilla_kd",, "seed": 1}', "not valid JSON: Expecting"),
    "empty": (b"", "empty file"),
    "a list": (b"[1, 2, 3]", "a JSON list, not an object"),
    "no seed": (without("seed"), "lacks the required key seed"),
    "no metrics or task": (
        json.dumps({"method": "x", "seed": 1, "main_metric": "accuracy"}).encode(),
        "lacks the required keys task, metrics",
    ),
    "other schema": (json.dumps({**valid_result(), "schema_version": 2}).encode(), "schema version 2"),
    "main metric missing": (
        json.dumps({**valid_result(), "metrics": {"val/f1": 0.5}}).encode(),
        "`metrics` lacks val/accuracy",
    ),
    "score not a number": (
        json.dumps({**valid_result(), "metrics": {"val/accuracy": "0.85"}}).encode(),
        "values that are not numbers: val/accuracy",
    ),
    "NaN score": (
        json.dumps({**valid_result(), "metrics": {"val/accuracy": float("nan")}}).encode(),
        "= nan, not a score",
    ),
    "seed a string": (json.dumps({**valid_result(), "seed": "1"}).encode(), '`seed` is "1", not an integer'),
}


@pytest.mark.usefixtures("no_figures")
@pytest.mark.parametrize("kind", list(DAMAGED))
def test_a_damaged_results_json_is_one_line_naming_it_the_rest_is_reported_exit_status_2(
    tmp_path: Path, capsys, kind: str
) -> None:
    content, problem = DAMAGED[kind]
    good_sweep(tmp_path)
    damaged = tmp_path / "sst2_vanilla_kd_1"
    (damaged / ".hydra").mkdir(parents=True)
    (damaged / "results.json").write_bytes(content)

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    naming = [line for line in err.splitlines() if "sst2_vanilla_kd_1" in line]
    assert naming == [line for line in naming if problem in line] and len(naming) == 1, err
    assert naming[0].startswith(f"kdexp-report: {damaged / 'results.json'}: ")
    assert "Traceback" not in err
    _, rows = markdown_rows(out)
    assert list(rows) == ["teacher", "finetune"] and rows["finetune"][0].startswith(mean_std([0.80, 0.84]))
    listed = out.split("results.json files left out of the table (damaged):\n")[1].splitlines()
    assert listed[0].startswith("- sst2_vanilla_kd_1/results.json: ") and problem in listed[0]

    (tmp_path / "report.md").unlink()
    main([str(tmp_path), "--allow-missing"])  # accepted as a result missing from the table: status 0
    assert "sst2_vanilla_kd_1/results.json" in (tmp_path / "report.md").read_text()


def test_damaged_and_unfinished_runs_are_both_named(tmp_path: Path, capsys) -> None:
    good_sweep(tmp_path)
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)
    (tmp_path / "broken" / ".hydra").mkdir(parents=True)
    (tmp_path / "broken" / "results.json").write_text('{"task": "sst2", "met')
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "- unfinished\n" in out and "- broken/results.json: truncated JSON" in out
    assert "1 run(s) without results.json" in err and "broken/results.json: truncated JSON" in err


def test_only_damaged_results_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / "results.json").write_bytes(b"\x00\x01")
    with pytest.raises(SystemExit) as exit_info:
        report(tmp_path)
    message = str(exit_info.value)
    assert f"{tmp_path / 'run' / 'results.json'}: binary data" in message and "No usable results.json" in message


# --------------------------------------------------------------------------- MNLI, QQP and MRPC columns


def test_mnli_shows_matched_and_mismatched_columns(tmp_path: Path) -> None:
    matched, mismatched = {"finetune": [0.80, 0.79, 0.81]}, {"finetune": [0.81, 0.805, 0.82]}
    for seed, (m, mm) in enumerate(zip(matched["finetune"], mismatched["finetune"]), 1):
        write_run(tmp_path, "mnli", "finetune", seed, {MATCHED: m, MISMATCHED: mm}, {MATCHED: 0.84, MISMATCHED: 0.845})
    # an older run: matched accuracy only (its main metric); it still counts there
    for seed, m in ((1, 0.82), (2, 0.83)):
        write_run(tmp_path, "mnli", "vanilla_kd", seed, {MATCHED: m}, {MATCHED: 0.84})
    titles, rows = markdown_rows(report(tmp_path))
    assert titles == ["mnli-m (accuracy)", "mnli-mm (accuracy)"]
    assert rows["teacher"] == ["84.0", "84.5"]
    assert rows["finetune"][0].startswith(mean_std(matched["finetune"]) + " [") and rows["finetune"][0].endswith("n=3")
    assert rows["finetune"][1].startswith(mean_std(mismatched["finetune"]) + " [")
    assert rows["vanilla_kd"][0].startswith(mean_std([0.82, 0.83])) and rows["vanilla_kd"][1] == "–"
    with open(tmp_path / "report.csv") as f:
        by_method = {r["method"]: r for r in csv.DictReader(f)}
    assert by_method["finetune"]["mnli-mm_mean"] == f"{100 * statistics.fmean(mismatched['finetune']):.2f}"
    assert by_method["vanilla_kd"]["mnli-mm_n"] == "0" and by_method["vanilla_kd"]["mnli-m_n"] == "2"


def test_older_mnli_runs_alone_show_their_main_metric(tmp_path: Path) -> None:
    for seed, m in ((1, 0.82), (2, 0.83)):
        write_run(tmp_path, "mnli", "finetune", seed, {MATCHED: m})
    titles, rows = markdown_rows(report(tmp_path))
    assert titles == ["mnli-m (accuracy)"] and rows["finetune"][0].startswith(mean_std([0.82, 0.83]))


@pytest.mark.parametrize("task", ["qqp", "mrpc"])
def test_qqp_and_mrpc_show_accuracy_and_f1_and_count_once_in_the_average(tmp_path: Path, task: str) -> None:
    accuracy, f1 = [0.88, 0.885, 0.878], [0.84, 0.846, 0.838]
    for seed, (acc, f) in enumerate(zip(accuracy, f1), 1):
        write_run(
            tmp_path,
            task,
            "finetune",
            seed,
            {"val/accuracy": acc, "val/f1": f, "val/combined_score": (acc + f) / 2},
            {"val/accuracy": 0.91, "val/f1": 0.88, "val/combined_score": 0.895},
        )
        write_run(tmp_path, "rte", "finetune", seed, {"val/accuracy": 0.6 + seed / 100}, {"val/accuracy": 0.7})
    written = write_report(tmp_path, layout="paper")
    titles, rows = markdown_rows(written.markdown)
    assert titles == [f"{task} (accuracy)", f"{task} (F1)", "rte (accuracy)", "Avg"]
    assert rows["finetune"][0].startswith(mean_std(accuracy)) and rows["finetune"][1].startswith(mean_std(f1))
    assert rows["teacher"][:2] == ["91.0", "88.0"]
    task_score = 100 * (statistics.fmean(accuracy) + statistics.fmean(f1)) / 2  # the task counts once
    assert rows["finetune"][3] == f"{(task_score + 100 * statistics.fmean([0.61, 0.62, 0.63])) / 2:.1f}"
    with open(tmp_path / "report.csv") as f:
        header = next(csv.reader(f))
    assert f"{task}-acc_mean" in header and f"{task}-f1_ci_high" in header and f"{task}_mean" not in header
    tex = (tmp_path / "report.tex").read_text()
    assert f"{task} (accuracy) & {task} (F1)" in tex


def test_older_qqp_runs_without_accuracy_and_f1_show_their_main_metric(tmp_path: Path) -> None:
    for seed, score in ((1, 0.86), (2, 0.87)):
        write_run(tmp_path, "qqp", "finetune", seed, {"val/combined_score": score})
    titles, rows = markdown_rows(report(tmp_path))
    assert titles == ["qqp (combined score)"] and rows["finetune"][0].startswith(mean_std([0.86, 0.87]))


def test_select_on_dev_chooses_qqp_on_accuracy_and_f1_together_and_keeps_both(tmp_path: Path) -> None:
    # alpha=0.5: acc 88, F1 80 (mean 84); alpha=0.9: acc 87, F1 83 (mean 85): 0.9 is chosen for both columns
    for alpha, acc, f1 in (("0.5", 0.88, 0.80), ("0.9", 0.87, 0.83)):
        for seed in (1, 2):
            run = write_run(
                tmp_path / alpha,
                "qqp",
                "vanilla_kd",
                seed,
                {"val/accuracy": acc + seed / 1000, "val/f1": f1, "val/combined_score": (acc + f1) / 2},
            )
            result = json.loads((run / "results.json").read_text())
            result["overrides"].append(f"method.alpha={alpha}")
            (run / "results.json").write_text(json.dumps(result))
    markdown = report(tmp_path, select_on="dev")
    _, rows = markdown_rows(markdown)
    assert [c.split(" [")[0] for c in rows["vanilla_kd [selected on dev]"]] == [mean_std([0.871, 0.872]), "83.0 ± 0.0"]
    assert "- vanilla_kd, qqp: chose vanilla_kd (method.alpha=0.9)" in markdown


def test_published_numbers_for_mnli_compare_with_matched_and_qqp_asks_which_column(tmp_path: Path) -> None:
    for seed in (1, 2):
        write_run(tmp_path / "runs", "mnli", "vanilla_kd", seed, {MATCHED: 0.80, MISMATCHED: 0.81})
        write_run(
            tmp_path / "runs",
            "qqp",
            "vanilla_kd",
            seed,
            {"val/accuracy": 0.88, "val/f1": 0.84, "val/combined_score": 0.86},
        )
    (tmp_path / "ref.yaml").write_text(
        "source: A paper, Table 1\nvalues:\n  mnli: {vanilla_kd: 79.0}\n"
        "  mnli-mm: {vanilla_kd: 80.5}\n  qqp: {vanilla_kd: 85.0}\n"
    )
    markdown = report(tmp_path / "runs", reference=tmp_path / "ref.yaml")
    assert "| vanilla_kd | mnli-m | 80.0 ± 0.0 | 79.0 | +1.0 |" in markdown
    assert "| vanilla_kd | mnli-mm | 81.0 ± 0.0 | 80.5 | +0.5 |" in markdown
    assert "- `qqp` has two columns here: give its published numbers under qqp-acc or qqp-f1" in markdown


def test_table_records_name_each_columns_metric(tmp_path: Path) -> None:
    for seed, (m, mm) in enumerate(((0.80, 0.81), (0.82, 0.80)), 1):
        write_run(tmp_path, "mnli", "finetune", seed, {MATCHED: m, MISMATCHED: mm})
    from kdexp.report import find_runs, load_results

    records = table_records(load_results(find_runs(tmp_path).results).values())
    cells = records[0]["cells"]
    assert {k: (c["task"], c["metric"]) for k, c in cells.items()} == {
        "mnli-m": ("mnli", MATCHED),
        "mnli-mm": ("mnli", MISMATCHED),
    }
    assert cells["mnli-mm"]["mean"] == pytest.approx(100 * statistics.fmean([0.81, 0.80]))
