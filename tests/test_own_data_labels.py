"""Own data (task=custom): a missing, empty or null label, or an empty text, is refused with file:line
before any training; the classes come from the training file's valid labels only."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdexp.data import file_split, labels_in, read_table_lines
from kdexp.errors import DataError
from kdexp.run import run
from kdexp.tasks import custom_task
from tests.conftest import SENTENCES
from tests.test_own_data import LABELS, custom_cfg, write_csv


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def own_task(
    train: Path,
    dev: Path,
    labels: tuple[str, ...] | None = ("neg", "pos"),
    regression: bool = False,
    allow_empty_text: bool = False,
):
    return custom_task(
        "mine",
        str(train),
        str(dev),
        ("text",),
        "label",
        None if regression else labels,
        regression,
        "combined_score" if regression else "accuracy",
        allow_empty_text,
    )


def assert_no_training(cache: Path) -> None:
    """Refused before the teacher stage trained anything (and so before the student)."""
    assert not list(cache.glob("teachers/*/teacher.json"))


@pytest.fixture
def dev_file(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "dev.csv", SENTENCES[:6], LABELS[:6])


# --------------------------------------------------------------------------- labels


def test_an_empty_label_cell_is_refused_with_file_and_line(tmp_path: Path, dev_file: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"the movie is good",pos\n"a bad movie",\n"great film",neg\n')
    with pytest.raises(DataError, match=r"train.csv:3: the label \('label'\) is empty; give every row a label"):
        labels_in(train, "label")
    with pytest.raises(DataError, match=r"train.csv:3: the label \('label'\) is empty"):
        file_split(own_task(train, dev_file), "train")


def test_a_null_or_absent_jsonl_label_is_refused_with_file_and_line(tmp_path: Path, dev_file: Path) -> None:
    null = write_jsonl(tmp_path / "null.jsonl", [{"text": "good fun", "label": "pos"}, {"text": "dull", "label": None}])
    with pytest.raises(DataError, match=r"null.jsonl:2: the label \('label'\) is null"):
        labels_in(null, "label")
    absent = tmp_path / "absent.jsonl"
    absent.write_text('{"text": "good fun", "label": "pos"}\n\n{"text": "dull"}\n')  # a blank line: still line 3
    with pytest.raises(
        DataError, match=r"absent.jsonl:3: the row has no 'label' \(its label\); give every row a label"
    ):
        labels_in(absent, "label")
    with pytest.raises(DataError, match=r"absent.jsonl:3: the row has no 'label'"):
        file_split(own_task(absent, dev_file), "train")


def test_a_label_written_as_a_missing_value_is_not_a_class(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", SENTENCES[:3], ["pos", "None", "neg"])
    with pytest.raises(DataError, match=r"train.csv:3: the label is 'None', a missing value.*task.labels"):
        labels_in(train, "label")
    with pytest.raises(DataError, match=r"train.csv:3: the label is 'None', a missing value"):
        file_split(own_task(train, train), "train")
    # listed in task.labels, it is a class
    assert file_split(own_task(train, train, labels=("neg", "None", "pos")), "train")["label"] == [2, 1, 0]


def test_the_classes_are_the_training_files_valid_labels(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": s, "label": y} for s, y in zip(SENTENCES, LABELS)])
    assert labels_in(train, "label") == ("neg", "pos")
    numbers = write_jsonl(
        tmp_path / "numbers.jsonl", [{"text": s, "label": i % 3 * 5} for i, s in enumerate(SENTENCES)]
    )
    assert labels_in(numbers, "label") == ("0", "5", "10")  # numerically, never '' or 'None'


def test_a_regression_file_refuses_an_empty_or_non_finite_score(tmp_path: Path) -> None:
    scores = tmp_path / "scores.csv"
    scores.write_text('text,label\n"good fun",1.5\n"dull",\n')
    with pytest.raises(DataError, match=r"scores.csv:3: the label \('label'\) is empty"):
        file_split(own_task(scores, scores, regression=True), "train")
    scores.write_text('text,label\n"good fun",1.5\n"dull",nan\n')
    with pytest.raises(DataError, match=r"scores.csv:3: label 'nan' is not a finite number"):
        file_split(own_task(scores, scores, regression=True), "train")


def test_line_numbers_count_quoted_line_breaks_and_blank_lines(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text('text,label\n"two\nlines",pos\n\n"one line",neg\n')
    assert [line for line, _ in read_table_lines(table)] == [2, 5]


# --------------------------------------------------------------------------- texts


def test_an_empty_text_is_refused_with_file_and_line(tmp_path: Path, dev_file: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"good fun",pos\n"  ",neg\n')
    with pytest.raises(
        DataError, match=r"train.csv:3: the text in column 'text' is empty; .*task.allow_empty_text=true"
    ):
        file_split(own_task(train, dev_file), "train")
    null = write_jsonl(tmp_path / "null.jsonl", [{"text": "good fun", "label": "pos"}, {"text": None, "label": "neg"}])
    with pytest.raises(DataError, match=r"null.jsonl:2: the text in column 'text' is empty"):
        file_split(own_task(null, dev_file), "train")


def test_allow_empty_text_keeps_and_counts_them(
    tmp_path: Path, dev_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [{"text": "good fun", "label": "pos"}, {"text": "", "label": "neg"}, {"text": None, "label": "pos"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="kdexp.data"):
        for _ in range(2):  # the teacher stage and the student both load the file: one line says it
            split = file_split(own_task(train, dev_file, allow_empty_text=True), "train")
    assert split["text"] == ["good fun", "", ""] and split["label"] == [1, 0, 1]  # never the text 'None'
    said = [r.getMessage() for r in caplog.records if "empty text" in r.getMessage()]
    assert said == [f"{train}: 2 row(s) with an empty text kept (task.allow_empty_text=true)."]


# --------------------------------------------------------------------------- before any training


@pytest.mark.parametrize("which", ["train", "dev"])
def test_a_run_refuses_a_missing_label_in_either_file_before_training(
    which: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    good = write_csv(tmp_path / "good.csv", SENTENCES, LABELS)
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"the movie is good",pos\n"a bad movie",\n')
    train, dev = (bad, good) if which == "train" else (good, bad)
    with pytest.raises(DataError, match=r"bad.csv:3: the label \('label'\) is empty"):
        run(custom_cfg(tiny_model_dir, glue_dir, tmp_path, train, dev), tmp_path / "run")
    assert_no_training(tmp_path / "cache")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "results.json").exists()


def test_a_run_refuses_an_empty_dev_text_unless_allowed(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", SENTENCES, LABELS)
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\n" + "".join(f'"{s}",{y}\n' for s, y in zip(SENTENCES[:5], LABELS)) + '"",pos\n')
    with pytest.raises(DataError, match=r"dev.csv:7: the text in column 'text' is empty"):
        run(custom_cfg(tiny_model_dir, glue_dir, tmp_path, train, dev), tmp_path / "run")
    assert_no_training(tmp_path / "cache")

    results = run(
        custom_cfg(
            tiny_model_dir,
            glue_dir,
            tmp_path,
            train,
            dev,
            "method=finetune",
            "trainer.max_epochs=1",
            "task.allow_empty_text=true",
        ),
        tmp_path / "allowed",
    )
    assert results["config"]["task"]["allow_empty_text"] is True
    assert json.loads((tmp_path / "allowed" / "results.json").read_text())["metrics"] == results["metrics"]


def test_kdexp_train_prints_the_refusal_in_one_line(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "good fun", "label": "pos"}, {"text": "dull", "label": None}]
    )
    dev = write_csv(tmp_path / "dev.csv", SENTENCES[:6], LABELS[:6])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdexp.train",
            "task=custom",
            f"task.train_file={train}",
            f"task.dev_file={dev}",
            f"teacher.name_or_path={tiny_model_dir}",
            f"data.glue_dir={glue_dir}",
            "data.max_length=32",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "logger=none",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"kdexp-train: error: {train}:2: the label ('label') is null; give every row a label, or drop the row."
    )
    assert_no_training(tmp_path / "cache")
