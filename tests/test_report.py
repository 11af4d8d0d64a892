"""`kdexp-report`: the table's numbers against a hand computation, on results.json files written here."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from kdexp.report import main, report


def start_run(run: Path) -> Path:
    """A run folder as kdexp-train leaves it before results.json is written."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    return run


def write_result(
    folder: Path,
    task: str,
    method: str,
    seed: int,
    score: float,
    teacher: float,
    extra: tuple[str, ...] = (),
    teacher_key: str | None = None,
    name: str | None = None,
) -> Path:
    metric = {"sst2": "accuracy", "cola": "matthews_correlation"}[task]
    run = start_run(folder / (name or "_".join([task, method, str(seed), *extra])))
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": task,
                "method": method,
                "seed": seed,
                "main_metric": metric,
                "metrics": {f"val/{metric}": score},
                "teacher_metrics": {f"val/{metric}": teacher},
                "teacher_key": teacher_key or f"{task}-teacher",
                "overrides": [f"task={task}", f"method={method}", f"seed={seed}", *extra],
            }
        )
    )
    return run


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The first table's rows: label -> cells, each as `mean ± std` (its CI and n are tested in test_report_stats.py)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line.strip("|").split("|") for line in lines[start:end] if line.startswith("| ")]
    return {cells[0].strip(): [mean_std(c.strip()) for c in cells[1:]] for cells in rows[1:]}


def mean_std(cell: str) -> str:
    """`76.7 ± 0.9 [75.6, 77.8] n=3` -> `76.7 ± 0.9`; `80.0 n=1` -> `80.0`."""
    return cell.split(" [")[0].split(" n=")[0]


def listed_unfinished(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    if "Runs without results.json (failed or unfinished):" not in lines:
        return []
    start = lines.index("Runs without results.json (failed or unfinished):") + 1
    return [line.removeprefix("- ") for line in lines[start:] if line.startswith("- ")]


def test_mean_and_std_over_seeds_per_task_and_method(tmp_path: Path) -> None:
    sst2 = {"finetune": [0.80, 0.82, 0.78], "vanilla_kd": [0.85, 0.84, 0.83]}
    cola = {"finetune": [0.10, 0.20, 0.30]}
    for method, scores in sst2.items():
        for seed, score in enumerate(scores, 1):
            # a progress-bar override on some runs only must not split the row
            write_result(
                tmp_path, "sst2", method, seed, score, 0.9, ("trainer.enable_progress_bar=False",) * (seed == 1)
            )
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


def test_a_run_that_took_an_option_from_its_yaml_shares_the_row_of_runs_given_it_on_the_command_line(
    tmp_path: Path,
) -> None:
    """An experiment's default changed between seeds: seeds launched with `student.num_layers=4` and one whose
    YAML said 4 are one row; a run whose config holds another value has its own, labelled with that value."""

    def with_layers(run: Path, layers: int) -> None:
        result = json.loads((run / "results.json").read_text())
        result["config"] = {"student": {"num_layers": layers, "init": "first_layers"}, "seed": result["seed"]}
        (run / "results.json").write_text(json.dumps(result))

    same = tmp_path / "same"
    with_layers(write_result(same, "sst2", "finetune", 1, 0.80, 0.9, ("student.num_layers=4",)), 4)
    with_layers(write_result(same, "sst2", "finetune", 2, 0.82, 0.9), 4)
    assert table_rows(report(same)) == {"teacher": ["90.0"], "finetune": ["81.0 ± 1.4"]}

    shutil.copytree(same, tmp_path / "other")
    with_layers(write_result(tmp_path / "other", "sst2", "finetune", 3, 0.70, 0.9), 2)
    rows = table_rows(report(tmp_path / "other"))
    assert rows["finetune (student.num_layers=4)"] == ["81.0 ± 1.4"]
    assert rows["finetune (student.num_layers=2)"] == ["70.0"]


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
            write_result(
                tmp_path / samples,
                "cola",
                "vanilla_kd",
                seed,
                0.03 + seed / 100,
                teacher,
                (f"teacher.max_train_samples={samples}",),
                teacher_key=key,
            )
    rows = table_rows(report(tmp_path))
    assert rows["teacher (teacher.max_train_samples=2000)"] == ["6.1"]
    assert rows["teacher (teacher.max_train_samples=null)"] == ["28.0"]
    assert "teacher" not in rows

    # teachers that no shown override tells apart are labelled by their cache key
    write_result(tmp_path / "other", "sst2", "finetune", 1, 0.8, 0.9, teacher_key="sst2-a")
    write_result(tmp_path / "other", "sst2", "finetune", 2, 0.8, 0.7, teacher_key="sst2-b")
    rows = table_rows(report(tmp_path / "other"))
    assert rows["teacher [sst2-a]"] == ["90.0"] and rows["teacher [sst2-b]"] == ["70.0"]


def test_runs_without_results_are_listed_and_fail_the_exit_status(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    write_result(sweep, "sst2", "finetune", 1, 0.80, 0.9, name="0_sst2_finetune_seed1")
    write_result(sweep, "sst2", "finetune", 2, 0.84, 0.9, name="1_sst2_finetune_seed2")
    failed = start_run(sweep / "2_sst2_finetune_seed3")
    (failed / "checkpoints").mkdir()
    unfinished = start_run(sweep / "3_sst2_finetune_seed4")
    # neither a renamed results.json nor one kept in a subfolder is this run's result
    (failed / "results.json.bak").write_text(json.dumps({"task": "sst2"}))
    (unfinished / "replaced").mkdir()
    shutil.copy(sweep / "0_sst2_finetune_seed1" / "results.json", unfinished / "replaced" / "results.json")

    markdown = report(sweep)
    assert listed_unfinished(markdown) == ["2_sst2_finetune_seed3", "3_sst2_finetune_seed4"]
    assert table_rows(markdown)["finetune"] == [f"82.0 ± {100 * statistics.stdev([0.80, 0.84]):.1f}"]
    assert "2 runs." in markdown

    (sweep / "report.md").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert listed_unfinished(out) == ["2_sst2_finetune_seed3", "3_sst2_finetune_seed4"]
    assert "2 run(s) without results.json" in err and "--allow-missing" in err
    assert (sweep / "report.md").read_text() == out

    (sweep / "report.md").unlink()
    main([str(sweep), "--allow-missing"])
    assert listed_unfinished((sweep / "report.md").read_text()) == ["2_sst2_finetune_seed3", "3_sst2_finetune_seed4"]


def test_runs_are_found_in_sweeps_inside_a_folder_of_sweeps(tmp_path: Path, capsys) -> None:
    write_result(tmp_path / "day1" / "sweep_a", "sst2", "finetune", 1, 0.80, 0.9)
    write_result(tmp_path / "day1" / "sweep_b", "sst2", "vanilla_kd", 1, 0.85, 0.9)
    start_run(tmp_path / "day2" / "sweep_c" / "0_sst2_vanilla_kd_seed2")
    markdown = report(tmp_path)
    assert table_rows(markdown) == {"teacher": ["90.0"], "finetune": ["80.0"], "vanilla_kd": ["85.0"]}
    assert listed_unfinished(markdown) == ["day2/sweep_c/0_sst2_vanilla_kd_seed2"]
    main([str(tmp_path / "day1")])  # no run there is missing: exit status 0
    assert listed_unfinished(capsys.readouterr().out) == []


def test_a_run_reported_twice_is_refused_naming_both_results(tmp_path: Path) -> None:
    run = write_result(tmp_path / "sweep", "sst2", "finetune", 1, 0.80, 0.9, name="0_sst2_finetune_seed1")
    shutil.copytree(run, tmp_path / "sweep" / "copy_of_0")
    with pytest.raises(SystemExit) as exit_info:
        report(tmp_path)
    message = str(exit_info.value)
    assert str(run / "results.json") in message and str(tmp_path / "sweep" / "copy_of_0" / "results.json") in message
    assert "pass only one of the folders" in message
    assert not (tmp_path / "report.md").exists()


def test_runs_differing_only_in_a_result_option_are_not_duplicates(tmp_path: Path) -> None:
    write_result(tmp_path / "a", "sst2", "vanilla_kd", 1, 0.80, 0.9, ("method.alpha=0.5",))
    write_result(tmp_path / "b", "sst2", "vanilla_kd", 1, 0.84, 0.9, ("method.alpha=0.9",))
    rows = table_rows(report(tmp_path))
    assert rows["vanilla_kd (method.alpha=0.5)"] == ["80.0"] and rows["vanilla_kd (method.alpha=0.9)"] == ["84.0"]

    # a progress bar cannot change a score: the same run twice
    write_result(
        tmp_path / "c", "sst2", "vanilla_kd", 1, 0.81, 0.9, ("method.alpha=0.5", "trainer.enable_progress_bar=False")
    )
    with pytest.raises(SystemExit, match="run twice, not two seeds"):
        report(tmp_path)


def test_runs_rewarded_on_the_dev_set_are_marked(tmp_path: Path) -> None:
    for seed, score in ((1, 0.8), (2, 0.9)):
        run = write_result(tmp_path, "sst2", "knowledge_selection", seed, score, 0.9, ("method.reward.split=dev",))
        result = json.loads((run / "results.json").read_text())
        result["method_info"] = {"reward_split": "dev"}
        (run / "results.json").write_text(json.dumps(result))
    rows = table_rows(report(tmp_path))
    assert rows["knowledge_selection [reward on dev]"] == ["85.0 ± 7.1"]


def test_latex_svg_average_and_published_numbers(tmp_path: Path) -> None:
    import re

    from kdexp.report import write_report

    scores = {
        ("sst2", "finetune"): [0.70, 0.72],
        ("sst2", "vanilla_kd"): [0.80, 0.82],
        ("cola", "finetune"): [0.30, 0.34],
        ("cola", "vanilla_kd"): [0.20, 0.22],
    }
    for (task, method), values in scores.items():
        for seed, score in enumerate(values, 1):
            write_result(tmp_path / "runs", task, method, seed, score, 0.9)
    (tmp_path / "published.yaml").write_text(
        "source: A paper, Table 2\nvalues:\n  sst2:\n    vanilla_kd: 80.0\n    finetune: null\n"
    )
    written = write_report(
        tmp_path / "runs", out=tmp_path / "out", layout="paper", reference=tmp_path / "published.yaml"
    )
    rows = table_rows(written.markdown.split("Published")[0])
    assert rows["finetune"] == ["32.0 ± 2.8", "71.0 ± 1.4", "51.5"] and rows["vanilla_kd"][2] == "51.0"  # Avg column
    assert "| vanilla_kd | sst2 | 81.0 ± 1.4 | 80.0 | +1.0 |" in written.markdown
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{81.0 $\pm$ 1.4}" in tex and r"\textbf{32.0 $\pm$ 2.8}" in tex
    assert r"\textbf{51.5}" in tex  # the best average
    svg = (tmp_path / "out" / "report.svg").read_text()
    bars = re.findall(
        r'<rect data-row="([^"]+)" data-task="([^"]+)" x="[^"]+" y="([^"]+)" width="[^"]+" height="([^"]+)"', svg
    )
    heights = {(row, task): float(h) for row, task, _, h in bars}
    assert (
        len(heights) == 4
        and heights[("vanilla_kd", "sst2")] > heights[("finetune", "sst2")] > heights[("finetune", "cola")]
    )


def test_a_reference_template_has_sources_to_fill_and_no_numbers(tmp_path: Path) -> None:
    import yaml

    write_result(tmp_path / "runs", "sst2", "vanilla_kd", 1, 0.8, 0.9)
    main([str(tmp_path / "runs"), "--reference-template", str(tmp_path / "ref.yaml")])
    template = yaml.safe_load((tmp_path / "ref.yaml").read_text())
    assert template["source"].startswith("FILL IN") and template["values"] == {"sst2": {"vanilla_kd": None}}


def test_select_on_dev_keeps_each_tasks_best_grid_cell_and_lists_the_cells(tmp_path: Path) -> None:
    # sst2: alpha=0.9 is best (81.5 vs 71.5); cola: alpha=0.5 is best (30 vs 20).
    for alpha, sst2, cola in (("0.5", 0.7, 0.30), ("0.9", 0.8, 0.20)):
        for seed in (1, 2):
            write_result(tmp_path, "sst2", "vanilla_kd", seed, sst2 + seed / 100, 0.9, (f"method.alpha={alpha}",))
            write_result(tmp_path, "cola", "vanilla_kd", seed, cola, 0.4, (f"method.alpha={alpha}",))
    for seed in (1, 2):
        write_result(tmp_path, "sst2", "finetune", seed, 0.6, 0.9)
    markdown = report(tmp_path, select_on="dev")
    rows = table_rows(markdown)
    assert rows["vanilla_kd [selected on dev]"] == ["30.0 ± 0.0", "81.5 ± 0.7"]
    assert rows["finetune"] == ["–", "60.0 ± 0.0"]  # one cell: unchanged
    assert not any("method.alpha" in label for label in rows)
    assert (
        "- vanilla_kd, sst2: chose vanilla_kd (method.alpha=0.9) from vanilla_kd (method.alpha=0.5): 71.5, "
        "vanilla_kd (method.alpha=0.9): 81.5" in markdown
    )
    assert "- vanilla_kd, cola: chose vanilla_kd (method.alpha=0.5)" in markdown


@pytest.mark.parametrize("fmt,starts", [("csv", "method,sst2_mean"), ("latex", "\\begin{"), ("markdown", "| method |")])
def test_format_chooses_what_is_printed(tmp_path: Path, capsys, fmt: str, starts: str) -> None:
    for seed in (1, 2):
        write_result(tmp_path, "sst2", "finetune", seed, 0.6 + seed / 100, 0.9)
    main([str(tmp_path), "--format", fmt])
    assert capsys.readouterr().out.lstrip().startswith(starts)


def test_figures_show_the_tables_means_and_stds_and_a_line_per_method_over_a_swept_option(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from kdexp.report import build_table, find_runs, load_results, row_label, varying_overrides, write_report
    from kdexp.report_plots import bar_figure, numeric_sweeps

    scores = {
        ("vanilla_kd", "0.2"): [0.80, 0.84],
        ("vanilla_kd", "0.5"): [0.82, 0.86],
        ("dbkd", "0.2"): [0.70, 0.74],
        ("dbkd", "0.5"): [0.78, 0.78],
    }
    for (method, alpha), values in scores.items():
        for seed, score in enumerate(values, 1):
            write_result(tmp_path / "runs", "sst2", method, seed, score, 0.9, (f"method.alpha={alpha}",))
    written = write_report(tmp_path / "runs", out=tmp_path / "out")
    assert sorted(p.name for p in written.figures) == [
        "report.pdf",
        "report.png",
        "report_method.alpha.pdf",
        "report_method.alpha.png",
    ]
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "out" / "report.pdf").read_bytes()[:5] == b"%PDF-"

    results = list(load_results(find_runs(tmp_path / "runs").results).values())
    tasks, rows = build_table(results)
    bars = [patch for patch in bar_figure(tasks, rows).axes[0].patches]
    expected = {label: cells["sst2"] for label, cells in rows.items() if not label.startswith("teacher")}
    assert [round(bar.get_height(), 6) for bar in bars] == [round(c.mean, 6) for c in expected.values()]
    lines = numeric_sweeps(results, varying_overrides(results), row_label)
    assert set(lines) == {"method.alpha"}
    for method in ("vanilla_kd", "dbkd"):
        points = lines["method.alpha"][method]["sst2"]
        for (x, mean, std, n), alpha in zip(points, ("0.2", "0.5")):
            values = [100 * v for v in scores[(method, alpha)]]
            assert (x, n) == (float(alpha), 2)
            assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(statistics.stdev(values))


def test_latex_bolds_every_row_tied_at_the_printed_precision() -> None:
    from kdexp.report import Cell
    from kdexp.report_formats import to_latex

    rows = {
        "teacher": {"sst2": Cell(90.0, 0.0, 1)},
        "a": {"sst2": Cell(80.04, 1.0, 3)},
        "b": {"sst2": Cell(80.01, 1.0, 3)},
        "c": {"sst2": Cell(79.9, 1.0, 3)},
    }
    bold = [line.split(" & ")[0] for line in to_latex(["sst2"], ["sst2"], rows, True).splitlines() if "textbf" in line]
    assert bold == ["a", "b"]  # 80.0 and 80.0 as printed; 79.9 not


def test_published_number_files_of_the_papers_are_empty_and_name_real_tasks_and_methods(tmp_path: Path) -> None:
    import yaml

    from kdexp.errors import DataError
    from kdexp.report import task_columns
    from kdexp.report_formats import load_reference
    from kdexp.tasks import TASKS

    root = Path(__file__).resolve().parents[1]
    methods = {p.stem for p in (root / "conf" / "method").glob("*.yaml")}
    files = sorted((root / "docs" / "published").glob("*.yaml"))
    assert {f.stem for f in files} == {"dbkd", "internal", "text_smoothing", "knowledge_selection"}
    for file in files:
        content = yaml.safe_load(file.read_text())
        assert content["source"].startswith("FILL IN"), file
        columns = {column.key for task in TASKS for column in task_columns(task)}
        assert set(content["values"]) <= set(TASKS) | columns, file  # a task, or one of a task's columns
        for task, row in content["values"].items():
            assert set(row) <= methods and all(v is None for v in row.values()), (file, task)
        assert load_reference(file)[1] == {task: {} for task in content["values"]}
    # a number typed into a template whose source was never filled in is refused
    filled = yaml.safe_load(files[0].read_text())
    filled["values"]["rte"]["dbkd"] = 70.0
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(filled))
    with pytest.raises(DataError, match="FILL IN"):
        load_reference(tmp_path / "ref.yaml")


def test_a_failed_job_is_listed_with_the_error_it_recorded(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_result(sweep, "sst2", "finetune", 1, 0.80, 0.9, name="0_sst2_finetune_seed1")
    failed = start_run(sweep / "1_sst2_finetune_seed2")
    (failed / "failed.json").write_text(json.dumps({"error": "OSFailure: no space left on device", "job": 1}))
    damaged_record = start_run(sweep / "2_sst2_finetune_seed3")
    (damaged_record / "failed.json").write_text("{not json")
    assert listed_unfinished(report(sweep)) == [
        "1_sst2_finetune_seed2 (failed: OSFailure: no space left on device)",
        "2_sst2_finetune_seed3",
    ]


def with_environment(result_file: Path, threads: int, revision: str = "abc123") -> None:
    result = json.loads(result_file.read_text())
    result["environment"] = {
        "kdexp": "0.1.0",
        "code_revision": revision,
        "libraries": {"torch": "2.13.0+cpu", "transformers": "5.25.0"},
        "cpu": "Xeon (AVX512)",
        "cpu_threads": threads,
        "devices": "1 x CPU",
        "precision": "32-true",
    }
    result_file.write_text(json.dumps(result))


def test_the_environments_that_made_the_runs_are_named_and_several_are_flagged(tmp_path: Path, capsys) -> None:
    one_thread = [write_result(tmp_path / "sweep", "sst2", "finetune", seed, 0.8, 0.9) for seed in (1, 2)]
    for run in one_thread:
        with_environment(run / "results.json", threads=1)
    same = report(tmp_path / "sweep")
    assert (
        "\nAll runs: code abc123; torch 2.13.0+cpu, transformers 5.25.0; Xeon (AVX512), 1 thread(s); 1 x CPU, 32-true.\n"
        in same
    )

    with_environment(write_result(tmp_path / "sweep", "sst2", "finetune", 3, 0.8, 0.9) / "results.json", threads=2)
    write_result(tmp_path / "sweep", "sst2", "finetune", 4, 0.8, 0.9)  # written before kdexp recorded it
    main([str(tmp_path / "sweep")])
    markdown = (tmp_path / "sweep" / "report.md").read_text()
    listed = markdown[markdown.index("The runs come from 3 environments:") :].splitlines()[1:4]
    assert listed == [
        "- 2 run(s): code abc123; torch 2.13.0+cpu, transformers 5.25.0; Xeon (AVX512), 1 thread(s); 1 x CPU, 32-true",
        "- 1 run(s): code abc123; torch 2.13.0+cpu, transformers 5.25.0; Xeon (AVX512), 2 thread(s); 1 x CPU, 32-true",
        "- 1 run(s): not recorded (a results.json from before kdexp recorded it)",
    ]
    assert "kdexp-report: the runs come from 3 environments" in capsys.readouterr().err


def write_squad_v2_result(folder: Path, method: str, seed: int, has_answer_f1: float, no_answer_f1: float) -> Path:
    """A SQuAD 2.0 run on a dev set of 10 answerable and 10 unanswerable questions."""
    run = start_run(folder / f"squad_v2_{method}_{seed}")
    f1 = (10 * has_answer_f1 + 10 * no_answer_f1) / 20
    metrics = {"val/exact_match": f1, "val/f1": f1, "val/HasAns_f1": has_answer_f1, "val/NoAns_f1": no_answer_f1}
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": "squad_v2",
                "method": method,
                "seed": seed,
                "main_metric": "f1",
                "metrics": metrics,
                "teacher_metrics": {**metrics, "val/HasAns_f1": 0.5, "val/f1": 0.75, "val/exact_match": 0.75},
                "teacher_key": "squad_v2-teacher",
                "overrides": ["task=squad_v2", f"method={method}", f"seed={seed}"],
            }
        )
    )
    return run


def test_squad_v2_runs_that_found_no_span_are_named_under_the_table(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    write_squad_v2_result(sweep, "finetune", 1, 0.0, 1.0)  # "no answer" everywhere: F1 = the unanswerable share
    write_squad_v2_result(sweep, "finetune", 2, 0.0, 1.0)
    write_squad_v2_result(sweep, "finetune", 3, 0.1, 1.0)  # one span partly right
    write_squad_v2_result(sweep, "vanilla_kd", 1, 0.0, 0.9)  # wrong spans, one unanswerable question answered
    write_squad_v2_result(sweep, "vanilla_kd", 2, 0.2, 0.8)
    main([str(sweep)])
    markdown = (sweep / "report.md").read_text()
    assert table_rows(markdown)["finetune"] == ["51.7 ± 2.9", "51.7 ± 2.9"]  # (50 + 50 + 55) / 3, sample std 2.89
    heading = next(line for line in markdown.splitlines() if line.startswith("Runs that found no answer span"))
    listed = markdown[markdown.index(heading) :].splitlines()[1:3]
    assert listed == ["- squad_v2: finetune: 2 of 3 run(s)", ""]
    assert "kdexp-report: 2 SQuAD 2.0 run(s) found no answer span" in capsys.readouterr().err

    for run in sweep.iterdir():
        if run.name.startswith("squad_v2_finetune"):
            shutil.rmtree(run)
    assert "Runs that found no answer span" not in report(sweep)


def write_dream_result(folder: Path, method: str, seed: int, score: float, teacher: float, teacher_key: str) -> Path:
    """A DREAM run whose dev set's most frequent answer position is right on 35% of its questions."""
    run = start_run(folder / f"dream_{method}_{seed}")
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": "dream",
                "method": method,
                "seed": seed,
                "main_metric": "accuracy",
                "metrics": {"val/accuracy": score},
                "teacher_metrics": {"val/accuracy": teacher},
                "majority_metrics": {"val/accuracy": 0.35},
                "teacher_key": teacher_key,
                "overrides": ["task=dream", f"method={method}", f"seed={seed}"],
            }
        )
    )
    return run


def test_runs_and_teachers_no_better_than_the_most_frequent_label_are_named_under_the_table(
    tmp_path: Path, capsys
) -> None:
    sweep = tmp_path / "sweep"
    write_dream_result(sweep, "finetune", 1, 0.35, 0.315, "weak")  # at the floor: counted
    write_dream_result(sweep, "finetune", 2, 0.30, 0.315, "weak")  # below it
    write_dream_result(sweep, "finetune", 3, 0.40, 0.315, "weak")
    write_dream_result(sweep, "dbkd", 1, 0.36, 0.315, "weak")
    write_dream_result(sweep, "dbkd", 2, 0.50, 0.60, "strong")  # another teacher, above the floor
    write_result(sweep, "sst2", "finetune", 1, 0.5, 0.9)  # no majority_metrics (an older run): left out
    main([str(sweep)])
    markdown = (sweep / "report.md").read_text()
    heading = next(line for line in markdown.splitlines() if line.startswith("Runs no better on dev than"))
    listed = markdown[markdown.index(heading) :].splitlines()[1:4]
    assert listed == [
        "- dream: finetune: 2 of 3 run(s) (most frequent label: 35.0)",
        "- dream: teacher: 1 of 2 teacher(s) (most frequent label: 35.0)",
        "",
    ]
    assert "kdexp-report: 2 run(s) and 1 teacher(s) are no better on dev than the most frequent label" in (
        capsys.readouterr().err
    )

    for run in sweep.iterdir():
        if run.name.startswith("dream_finetune"):
            shutil.rmtree(run)
    shutil.rmtree(sweep / "dream_dbkd_1")
    assert "Runs no better on dev than" not in report(sweep)
