"""`kdexp-report`'s statistics: t quantiles, cell intervals, paired differences from a baseline.

Every number is checked against an independent computation: scipy.stats, or an enumeration of
sign patterns written here in exact fractions.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import statistics
from fractions import Fraction
from pathlib import Path

import pytest

from kdexp.errors import DataError
from kdexp.report import (
    UnknownBaseline,
    difference_statistics,
    find_runs,
    load_results,
    main,
    regularized_beta,
    report,
    sign_flip_p_value,
    t_quantile,
    t_two_sided_p,
    table_records,
)

stats = pytest.importorskip("scipy.stats")


@pytest.fixture(autouse=True)
def no_figures(monkeypatch) -> None:
    """The PNG/PDF figures take most of a report's time and are tested in test_report.py."""
    monkeypatch.setattr("kdexp.report.write_plots", lambda *args, **kwargs: [])


def write_run(
    folder: Path,
    task: str,
    method: str,
    seed: int,
    score: float,
    teacher_key: str = "teacher-a",
    extra: tuple[str, ...] = (),
) -> Path:
    """A finished run of a one-metric task (sst2 or rte: accuracy) as kdexp-train leaves it."""
    run = folder / "_".join([task, method, str(seed), teacher_key, *extra])
    (run / ".hydra").mkdir(parents=True)
    (run / "results.json").write_text(
        json.dumps(
            {
                "task": task,
                "method": method,
                "seed": seed,
                "main_metric": "accuracy",
                "metrics": {"val/accuracy": score},
                "teacher_metrics": {"val/accuracy": 0.9},
                "teacher_key": teacher_key,
                "overrides": [f"task={task}", f"method={method}", f"seed={seed}", *extra],
            }
        )
    )
    return run


def markdown_rows(markdown: str, title: str | None = None) -> dict[str, list[str]]:
    """The cells of the first Markdown table after the line starting with `title` (or the first table)."""
    lines = markdown.splitlines()
    start = 0 if title is None else next(i for i, line in enumerate(lines) if line.startswith(title))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("| "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return {cells[0]: cells[1:] for cells in rows}


def scipy_interval(values: list[float]) -> tuple[float, float]:
    return stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values), scale=stats.sem(values))


# --------------------------------------------------------------------------- t distribution


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10, 16, 30, 31, 50, 101, 1000])
def test_t_quantile_matches_scipy(n: int) -> None:
    for p in (0.975, 0.95, 0.995, 0.9, 0.025):
        assert t_quantile(p, n - 1) == pytest.approx(stats.t.ppf(p, n - 1), rel=1e-9, abs=1e-12)


def test_t_tail_and_incomplete_beta_match_scipy() -> None:
    from scipy.special import betainc

    for df in (1, 2, 3, 5, 9, 29, 200):
        for t in (0.0, 0.05, 0.7, 1.0, 2.2, 6.0, 40.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-10, abs=1e-300)
    for a, b, x in itertools.product((0.5, 1.0, 4.5, 60.0), (0.5, 2.0, 30.0), (1e-4, 0.2, 0.5, 0.8, 0.9999)):
        assert regularized_beta(x, a, b) == pytest.approx(betainc(a, b, x), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("scores", [[0.80, 0.82, 0.78], [0.71, 0.70], [0.5, 0.61, 0.58, 0.66, 0.52, 0.6, 0.55]])
def test_each_cell_holds_n_mean_std_and_the_student_t_interval(tmp_path: Path, scores: list[float]) -> None:
    for seed, score in enumerate(scores, 1):
        write_run(tmp_path, "sst2", "finetune", seed, score)
    markdown = report(tmp_path)
    values = [100 * s for s in scores]
    low, high = scipy_interval(values)
    mean, std = statistics.fmean(values), statistics.stdev(values)
    assert markdown_rows(markdown)["finetune"] == [f"{mean:.1f} ± {std:.1f} [{low:.1f}, {high:.1f}] n={len(scores)}"]
    with open(tmp_path / "report.csv") as f:
        row = {r["method"]: r for r in csv.DictReader(f)}["finetune"]
    assert (row["sst2_n"], row["sst2_mean"], row["sst2_std"]) == (str(len(scores)), f"{mean:.2f}", f"{std:.2f}")
    assert (row["sst2_ci_low"], row["sst2_ci_high"]) == (f"{low:.2f}", f"{high:.2f}")
    assert r"\pm" in (tmp_path / "report.tex").read_text() and "[" not in (tmp_path / "report.tex").read_text()


def test_one_seed_has_no_interval(tmp_path: Path) -> None:
    write_run(tmp_path, "sst2", "finetune", 1, 0.8)
    assert markdown_rows(report(tmp_path))["finetune"] == ["80.0 n=1"]
    with open(tmp_path / "report.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["method"] == "finetune")
    assert (row["sst2_n"], row["sst2_ci_low"], row["sst2_ci_high"]) == ("1", "", "")


# --------------------------------------------------------------------------- sign-flip permutation test


def brute_force_sign_flip(differences: list[float]) -> Fraction:
    """Every sign pattern, in exact fractions: the share with |sum| at least the observed |sum|."""
    exact = [Fraction(str(d)) for d in differences]
    observed = abs(sum(exact))
    patterns = list(itertools.product((1, -1), repeat=len(exact)))
    return Fraction(sum(abs(sum(s * d for s, d in zip(signs, exact))) >= observed for signs in patterns), len(patterns))


def test_sign_flip_p_value_by_hand() -> None:
    # [1, 2, 3]: the 8 sums are ±6, ±4, ±2, 0, 0; only +6 and -6 reach 6: p = 2/8.
    assert sign_flip_p_value([1.0, 2.0, 3.0]) == 0.25
    assert sign_flip_p_value([1.0, -1.0]) == 1.0
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p_value([2.0, 2.0, 2.0, 2.0, 2.0]) == 2 / 32


def test_sign_flip_p_value_matches_an_enumeration_of_every_sign_pattern() -> None:
    rng = random.Random(3)
    cases = [[0.1, 0.2, 0.3], [0.3, -0.1, -0.2, 0.6], [1.1, 1.1, -1.1, 2.2, 0.0]]  # ties in exact arithmetic
    cases += [[round(rng.uniform(-3, 4), 2) for _ in range(n)] for n in range(1, 11) for _ in range(3)]
    cases += [[float(rng.randint(-3, 3)) for _ in range(n)] for n in (6, 9, 12)]  # integers: many ties
    for differences in cases:
        assert sign_flip_p_value(differences) == float(brute_force_sign_flip(differences)), differences


def test_sign_flip_p_value_above_16_pairs_is_a_close_estimate() -> None:
    differences = [float(d) for d in (3, -1, 2, 2, -2, 1, 4, 0, 1, -3, 2, 1, 1, -1, 2, 3, 1, -2)]
    # exact, by counting the sums reachable with each sign pattern (a distribution over integers)
    counts = {0: 1}
    for d in differences:
        nxt: dict[int, int] = {}
        for total, count in counts.items():
            for signed in (int(d), -int(d)):
                nxt[total + signed] = nxt.get(total + signed, 0) + count
        counts = nxt
    observed = abs(sum(differences))
    exact = sum(c for total, c in counts.items() if abs(total) >= observed) / 2 ** len(differences)
    assert sign_flip_p_value(differences, samples=40_000) == pytest.approx(exact, abs=0.01)


# --------------------------------------------------------------------------- paired differences


def test_paired_difference_matches_scipy_paired_t() -> None:
    ours, baseline = [81.2, 80.4, 82.9, 81.7], [80.1, 80.6, 81.0, 80.2]
    differences = [a - b for a, b in zip(ours, baseline)]
    result = difference_statistics(differences)
    test = stats.ttest_rel(ours, baseline)
    low, high = scipy_interval(differences)
    assert result.n_pairs == 4 and result.mean == pytest.approx(statistics.fmean(differences))
    assert result.ci == pytest.approx((low, high), rel=1e-9)
    assert result.ci == pytest.approx(tuple(test.confidence_interval(0.95)), rel=1e-9)
    assert result.p_t == pytest.approx(test.pvalue, rel=1e-9)
    assert result.p_permutation == float(brute_force_sign_flip(differences))
    one = difference_statistics([1.5])
    assert (one.n_pairs, one.mean, one.ci, one.p_t, one.p_permutation, one.significant) == (
        1,
        1.5,
        None,
        None,
        None,
        False,
    )


def write_comparison_sweep(folder: Path) -> dict[str, list[float]]:
    """sst2 scores per method and seed (teacher-a): one row clearly above finetune, one noisy, one
    below, one with a single shared seed; rte for finetune and vanilla_kd only."""
    scores = {
        "finetune": [0.800, 0.812, 0.795, 0.806],
        "vanilla_kd": [0.815, 0.824, 0.806, 0.821],  # +1.1 to +1.5 on every seed
        "noisy": [0.830, 0.790, 0.812, 0.790],  # +3.0, -2.2, +1.7, -1.6
        "worse": [0.781, 0.790, 0.780, 0.788],  # about -1.8 on every seed
        "lonely": [0.851],
    }  # seed 1 only
    for method, values in scores.items():
        for seed, score in enumerate(values, 1):
            write_run(folder, "sst2", method, seed, score)
    write_run(folder, "sst2", "lonely", 9, 0.7)  # a seed finetune does not have: not a pair
    for method, values in {"finetune": [0.6, 0.64, 0.62], "vanilla_kd": [0.61, 0.66, 0.60]}.items():
        for seed, score in enumerate(values, 1):
            write_run(folder, "rte", method, seed, score)
    return scores


def test_baseline_differences_match_scipy_and_the_dagger_marks_exactly_the_cis_excluding_zero(
    tmp_path: Path, capsys
) -> None:
    scores = write_comparison_sweep(tmp_path)
    main([str(tmp_path), "--baseline", "finetune"])
    markdown = capsys.readouterr().out
    table = markdown_rows(markdown)
    differences_table = markdown_rows(markdown, "Paired differences from finetune")
    with open(tmp_path / "report.csv") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    tex_rows = {
        line.split(" & ")[0]: line for line in (tmp_path / "report.tex").read_text().splitlines() if " & " in line
    }
    base = [100 * s for s in scores["finetune"]]
    for method in ("vanilla_kd", "noisy", "worse"):
        ours = [100 * s for s in scores[method]]
        differences = [a - b for a, b in zip(ours, base)]
        low, high = scipy_interval(differences)
        excludes_zero = low > 0 or high < 0
        p_t = stats.ttest_rel(ours, base).pvalue
        p_perm = float(brute_force_sign_flip([round(d, 6) for d in differences]))
        mark = "†" if excludes_zero else ""
        cell = table[method][0]  # columns: sst2, rte
        assert (("†" in cell) == excludes_zero) and cell.startswith(
            f"{statistics.fmean(ours):.1f} ± {statistics.stdev(ours):.1f}{mark} ["
        ), cell
        assert differences_table[method][0] == (
            f"{statistics.fmean(differences):+.1f}{mark} [{low:+.1f}, {high:+.1f}] "
            f"p_perm={p_perm:.3g} p_t={p_t:.3g} n=4"
        )
        row = csv_rows[method]
        assert float(row["sst2_diff"]) == pytest.approx(statistics.fmean(differences), abs=0.005)
        assert (float(row["sst2_diff_ci_low"]), float(row["sst2_diff_ci_high"])) == pytest.approx(
            (low, high), abs=0.005
        )
        assert float(row["sst2_p_t"]) == pytest.approx(p_t, rel=1e-3) and float(row["sst2_p_permutation"]) == p_perm
        assert row["sst2_n_pairs"] == "4" and row["baseline"] == "finetune"
        assert ("$^\\dagger$" in tex_rows[method.replace("_", "\\_")]) == excludes_zero
    assert [m for m in ("vanilla_kd", "noisy", "worse") if "†" in table[m][0]] == ["vanilla_kd", "worse"]
    # fewer than 2 shared seeds: the difference alone, and why there is no more
    assert differences_table["lonely"][0] == f"{100 * (0.851 - 0.800):+.1f} (1 shared seed: no CI, no test)"
    assert "†" not in table["lonely"][0]
    assert (
        csv_rows["lonely"]["sst2_n_pairs"],
        csv_rows["lonely"]["sst2_diff_ci_low"],
        csv_rows["lonely"]["sst2_p_t"],
    ) == ("1", "", "")
    assert differences_table["lonely"][1] == "–" and "finetune" not in differences_table  # no rte runs; no self-row
    assert (
        csv_rows["finetune"]["sst2_diff"] == "" and "% $^\\dagger$: the 95% CI" in (tmp_path / "report.tex").read_text()
    )


def test_pairs_are_the_same_teacher_and_seed(tmp_path: Path) -> None:
    for seed, (base, ours) in enumerate(((0.80, 0.82), (0.81, 0.84), (0.79, 0.80)), 1):
        write_run(tmp_path, "sst2", "finetune", seed, base, teacher_key="teacher-a")
        write_run(tmp_path, "sst2", "vanilla_kd", seed, ours, teacher_key="teacher-a")
    write_run(tmp_path, "sst2", "vanilla_kd", 1, 0.5, teacher_key="teacher-b")  # another teacher: no pair
    records = {
        r["row"]: r for r in table_records(load_results(find_runs(tmp_path).results).values(), baseline="finetune")
    }
    cell = records["vanilla_kd"]["cells"]["sst2"]
    differences = [100 * (o - b) for o, b in ((0.82, 0.80), (0.84, 0.81), (0.80, 0.79))]
    assert cell["n"] == 4 and cell["n_pairs"] == 3
    assert cell["diff"] == pytest.approx(statistics.fmean(differences))
    assert (cell["diff_ci_low"], cell["diff_ci_high"]) == pytest.approx(scipy_interval(differences))


def test_an_unknown_baseline_is_one_line_naming_the_rows_and_exit_status_2(tmp_path: Path, capsys) -> None:
    write_comparison_sweep(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--baseline", "fine_tune"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "'fine_tune'" in err and all(f"'{m}'" in err for m in ("finetune", "vanilla_kd", "noisy", "worse", "lonely"))
    assert "'teacher'" not in err and not (tmp_path / "report.md").exists()


# --------------------------------------------------------------------------- the Python API


def test_table_records_are_plain_dicts_with_the_tables_statistics(tmp_path: Path) -> None:
    scores = write_comparison_sweep(tmp_path)
    results = load_results(find_runs(tmp_path).results).values()
    records = table_records(results, baseline="finetune")
    assert json.loads(json.dumps(records)) == records  # plain: numbers, strings, None
    by_row = {r["row"]: r for r in records}
    assert [r["row"] for r in records] == ["teacher", "finetune", "lonely", "noisy", "vanilla_kd", "worse"]
    assert by_row["teacher"]["teacher"] and by_row["teacher"]["cells"]["sst2"]["mean"] == pytest.approx(90.0)
    values = [100 * s for s in scores["vanilla_kd"]]
    cell = by_row["vanilla_kd"]["cells"]["sst2"]
    assert (cell["task"], cell["metric"], cell["n"]) == ("sst2", "val/accuracy", 4)
    assert cell["mean"] == pytest.approx(statistics.fmean(values)) and cell["std"] == pytest.approx(
        statistics.stdev(values)
    )
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(scipy_interval(values))
    differences = [a - 100 * b for a, b in zip(values, scores["finetune"])]
    assert cell["diff"] == pytest.approx(statistics.fmean(differences)) and cell["significant"] is True
    assert cell["p_t"] == pytest.approx(stats.ttest_rel(values, [100 * s for s in scores["finetune"]]).pvalue)
    assert "diff" not in by_row["finetune"]["cells"]["sst2"] and "diff" not in by_row["teacher"]["cells"]["sst2"]
    assert (
        by_row["lonely"]["cells"]["sst2"]["n_pairs"] == 1 and by_row["lonely"]["cells"]["sst2"]["diff_ci_low"] is None
    )
    assert "diff" not in table_records(results)[1]["cells"]["sst2"]  # no baseline: no differences

    with pytest.raises(UnknownBaseline):
        table_records(results, baseline="nobody")
    with pytest.raises(DataError, match="lacks the required key seed"):
        table_records([{k: v for k, v in next(iter(results)).items() if k != "seed"}])


def test_a_row_selected_on_dev_is_compared_over_the_seeds_of_the_grid_cell_chosen(tmp_path: Path) -> None:
    base = [0.70, 0.72, 0.71]
    grid = {"0.5": [0.71, 0.74, 0.71], "0.9": [0.80, 0.81, 0.83]}  # 0.9 has the best mean: its seeds are paired
    for seed, score in enumerate(base, 1):
        write_run(tmp_path, "sst2", "finetune", seed, score)
    for alpha, values in grid.items():
        for seed, score in enumerate(values, 1):
            write_run(tmp_path, "sst2", "vanilla_kd", seed, score, extra=(f"method.alpha={alpha}",))
    records = table_records(load_results(find_runs(tmp_path).results).values(), baseline="finetune", select_on="dev")
    cell = {r["row"]: r for r in records}["vanilla_kd [selected on dev]"]["cells"]["sst2"]
    differences = [100 * (a - b) for a, b in zip(grid["0.9"], base)]
    assert cell["n_pairs"] == 3 and cell["diff"] == pytest.approx(statistics.fmean(differences))
    assert (cell["diff_ci_low"], cell["diff_ci_high"]) == pytest.approx(scipy_interval(differences))
