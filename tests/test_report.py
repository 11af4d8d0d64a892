"""`kdexp-report`: the table's numbers against a hand computation, on results.json files written here."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from kdexp.report import main, report


def write_result(folder: Path, task: str, method: str, seed: int, score: float, teacher: float,
                 extra: tuple[str, ...] = (), teacher_key: str | None = None) -> None:
    metric = {"sst2": "accuracy", "cola": "matthews_correlation"}[task]
    run = folder / "_".join([task, method, str(seed), *extra])
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "task": task, "method": method, "seed": seed, "main_metric": metric,
        "metrics": {f"val/{metric}": score}, "teacher_metrics": {f"val/{metric}": teacher},
        "teacher_key": teacher_key or f"{task}-teacher", "overrides": [f"task={task}", f"method={method}", f"seed={seed}", *extra],
    }))


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_mean_and_std_over_seeds_per_task_and_method(tmp_path: Path) -> None:
    sst2 = {"finetune": [0.80, 0.82, 0.78], "vanilla_kd": [0.85, 0.84, 0.83]}
    cola = {"finetune": [0.10, 0.20, 0.30]}
    for method, scores in sst2.items():
        for seed, score in enumerate(scores, 1):
            # a progress-bar override on some runs only must not split the row
            write_result(tmp_path, "sst2", method, seed, score, 0.9, ("trainer.enable_progress_bar=False",) * (seed == 1))
    for seed, score in enumerate(cola["finetune"], 1):
        write_result(tmp_path, "cola", "finetune", seed, score, 0.4)

    rows = table_rows(report(tmp_path))
    assert list(rows) == ["teacher", "finetune", "vanilla_kd"]  # GLUE column order: cola, then sst2
    for method, scores in sst2.items():
        expected = f"{100 * statistics.fmean(scores):.1f} ± {100 * statistics.stdev(scores):.1f}"
        assert rows[method][1] == expected
    assert rows["finetune"][0] == "20.0 ± 10.0"  # mean of 10, 20, 30; sample std 10
    assert rows["vanilla_kd"][0] == "–"
    assert rows["teacher"] == ["40.0", "90.0"]
    with open(tmp_path / "report.csv") as f:
        by_method = {r["method"]: r for r in csv.DictReader(f)}
    assert by_method["vanilla_kd"]["sst2_mean"] == "84.00" and by_method["vanilla_kd"]["sst2_n"] == "3"


def test_varying_method_options_get_their_own_rows(tmp_path: Path) -> None:
    for alpha, base in (("0.5", 0.7), ("0.9", 0.8)):
        for seed in (1, 2):
            write_result(tmp_path, "sst2", "vanilla_kd", seed, base + seed / 100, 0.9, (f"method.alpha={alpha}",))
    rows = table_rows(report(tmp_path))
    assert rows["vanilla_kd (method.alpha=0.5)"] == ["71.5 ± 0.7"]
    assert rows["vanilla_kd (method.alpha=0.9)"] == ["81.5 ± 0.7"]


def test_several_sweeps_make_one_table_written_to_out(tmp_path: Path, capsys) -> None:
    write_result(tmp_path / "baselines", "sst2", "finetune", 1, 0.8, 0.9)
    write_result(tmp_path / "method", "sst2", "text_smoothing", 1, 0.82, 0.9)
    main([str(tmp_path / "baselines"), str(tmp_path / "method"), "--out", str(tmp_path / "combined")])
    rows = table_rows(capsys.readouterr().out)
    assert rows == {"teacher": ["90.0"], "finetune": ["80.0"], "text_smoothing": ["82.0"]}
    assert (tmp_path / "combined" / "report.md").is_file() and not (tmp_path / "baselines" / "report.md").exists()


def test_different_teachers_get_their_own_rows_never_a_mean(tmp_path: Path) -> None:
    for samples, teacher, key in (("2000", 0.061, "cola-small"), ("null", 0.280, "cola-full")):
        for seed in (1, 2):
            write_result(tmp_path / samples, "cola", "vanilla_kd", seed, 0.03 + seed / 100, teacher,
                         (f"teacher.max_train_samples={samples}",), teacher_key=key)
    rows = table_rows(report(tmp_path))
    assert rows["teacher (teacher.max_train_samples=2000)"] == ["6.1"]
    assert rows["teacher (teacher.max_train_samples=null)"] == ["28.0"]
    assert "teacher" not in rows

    # teachers that no shown override tells apart are labelled by their cache key
    write_result(tmp_path / "other", "sst2", "finetune", 1, 0.8, 0.9, teacher_key="sst2-a")
    write_result(tmp_path / "other", "sst2", "finetune", 2, 0.8, 0.7, teacher_key="sst2-b")
    rows = table_rows(report(tmp_path / "other"))
    assert rows["teacher [sst2-a]"] == ["90.0"] and rows["teacher [sst2-b]"] == ["70.0"]
