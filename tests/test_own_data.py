"""A user's own data (task=custom), a teacher fine-tuned elsewhere, and kdexp-eval / kdexp-predict on the student."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdexp.errors import DataError
from kdexp.evaluate import eval_main, predict_main
from kdexp.run import run
from tests.conftest import SENTENCES
from tests.test_pipeline import tiny_cfg

LABELS = ["pos" if i % 2 else "neg" for i in range(len(SENTENCES))]


def write_csv(path: Path, sentences: list[str], labels: list[str] | None) -> Path:
    lines = ["text,label" if labels else "text"] + [
        f'"{s}",{y}' if labels else f'"{s}"' for s, y in zip(sentences, labels or sentences)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def own_files(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_csv(tmp_path / "train.csv", SENTENCES, LABELS),
        write_csv(tmp_path / "dev.csv", SENTENCES[:6], LABELS[:6]),
    )


def custom_cfg(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, train: Path, dev: Path, *overrides: str):
    return tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "task=custom",
        f"task.train_file={train}",
        f"task.dev_file={dev}",
        "task.name=mine",
        "trainer.max_epochs=2",
        *overrides,
    )


def test_own_csv_trains_a_teacher_and_a_student_and_is_scored_and_predicted(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, own_files: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    train, dev = own_files
    results = run(custom_cfg(tiny_model_dir, glue_dir, tmp_path, train, dev, "method=vanilla_kd"), tmp_path / "run")
    assert results["task"] == "mine" and set(results["metrics"]) == {"val/accuracy"}
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "run" / "student").id2label == {0: "neg", 1: "pos"}  # sorted labels

    # kdexp-eval on the run folder gives the run's own dev score
    eval_main([str(tmp_path / "run")])
    scored = json.loads(capsys.readouterr().out)
    assert scored["rows"] == 6 and scored["metrics"]["accuracy"] == pytest.approx(results["metrics"]["val/accuracy"])

    # kdexp-predict: one label and a probability per label for every text, agreeing with the scores
    texts = write_csv(tmp_path / "texts.csv", SENTENCES[:6], None)
    predict_main([str(tmp_path / "run"), str(texts), "--out", str(tmp_path / "pred.jsonl")])
    predictions = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predictions] == SENTENCES[:6]
    assert all(
        set(p["probabilities"]) == {"neg", "pos"} and abs(sum(p["probabilities"].values()) - 1) < 1e-5
        for p in predictions
    )
    accuracy = sum(p["label"] == y for p, y in zip(predictions, LABELS[:6])) / 6
    assert accuracy == pytest.approx(results["metrics"]["val/accuracy"])

    # A teacher fine-tuned elsewhere (here: the stored one) distils a new student on the same files.
    from kdexp.run import compose_config

    cfg = compose_config(
        [
            "task=custom",
            f"task.train_file={train}",
            f"task.dev_file={dev}",
            "task.name=mine",
            "teacher=finetuned",
            f"teacher.name_or_path={results['teacher_path']}",
            "method=vanilla_kd",
            f"data.glue_dir={glue_dir}",
            "data.batch_size=4",
            "data.max_length=32",
            f"cache_dir={tmp_path / 'cache'}",
            "logger=none",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "optim.learning_rate=1e-3",
            "seed=2",
        ]
    )
    finetuned = run(cfg, tmp_path / "run2")
    assert finetuned["teacher_metrics"] == results["teacher_metrics"]


def test_a_regression_file_and_a_pair_of_text_columns(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    rows = ["text_a,text_b,score"] + [
        f'"{a}","{b}",{i % 5}.5' for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[::-1]))
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    results = run(
        custom_cfg(
            tiny_model_dir,
            glue_dir,
            tmp_path,
            tmp_path / "pairs.csv",
            tmp_path / "pairs.csv",
            "method=finetune",
            "task.text_columns=[text_a,text_b]",
            "task.label_column=score",
            "task.regression=true",
        ),
        tmp_path / "run",
    )
    assert set(results["metrics"]) == {"val/pearson", "val/spearman", "val/combined_score"}


def test_bad_own_files_are_refused_in_one_line(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, own_files: tuple[Path, Path]
) -> None:
    train, dev = own_files
    with pytest.raises(DataError, match=r"no column \['sentence'\].*task.text_columns"):
        run(custom_cfg(tiny_model_dir, glue_dir, tmp_path, train, dev, "task.text_columns=[sentence]"), tmp_path / "r")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "pos"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        run(custom_cfg(tiny_model_dir, glue_dir, tmp_path, tmp_path / "bad.jsonl", dev), tmp_path / "r2")
    unknown = write_csv(tmp_path / "dev_unknown.csv", SENTENCES[:2], ["pos", "maybe"])
    with pytest.raises(DataError, match=r"dev_unknown.csv:3: label 'maybe' is not in the label set"):
        run(custom_cfg(tiny_model_dir, glue_dir, tmp_path, train, unknown), tmp_path / "r3")


def test_console_scripts_answer_in_one_line_on_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from kdexp.evaluate import eval_main; eval_main()", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("kdexp-eval: error:")
    assert "task=<name>" in proc.stderr and "Traceback" not in proc.stderr
