"""The Hub path tested offline: a folder in `nyu-mll/glue`'s own layout, read by the same `datasets.load_dataset`
call that reads the Hub (`data.source=hub data.hub_dataset=<folder>`), and the shipped SST-2 slice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import SENTENCES

from kdexp.data import DataError, DataSource, load_split, tokenized_key
from kdexp.hub_folder import hub_features, write_hub_folder
from kdexp.run import compose_config, run
from kdexp.tasks import get_task


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' own cache in the test's folder, and no network (the folder must be enough)."""
    import datasets
    import huggingface_hub.constants

    for module, name in (
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ):
        monkeypatch.setattr(module, name, True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def hub_dir(glue_dir: Path, tmp_path: Path, hub_cache: None) -> Path:
    return write_hub_folder(glue_dir, tmp_path / "glue_hub", ("sst2", "rte", "stsb", "mrpc", "mnli", "qqp", "qnli"))


@pytest.mark.parametrize("name", ["sst2", "rte", "stsb", "mrpc"])
def test_the_hub_layout_holds_the_classic_folders_rows_with_the_hubs_columns(
    glue_dir: Path, hub_dir: Path, name: str
) -> None:
    task = get_task(name)
    for split in (task.train_split, *task.eval_splits):
        classic = load_split(task, split, DataSource(glue_dir))
        hub = load_split(task, split, DataSource(None, str(hub_dir)))
        assert hub.column_names == classic.column_names == [*task.text_fields, "label"]
        for name in task.text_fields:
            assert hub[name] == classic[name]
        assert hub["label"] == pytest.approx(classic["label"])  # STS-B scores: float32 on the Hub
        if not task.is_regression:  # the same rows: the same tokenised cache entry as the classic files'
            assert tokenized_key(hub, task, _tokenizer(), 32) == tokenized_key(classic, task, _tokenizer(), 32)


def _tokenizer():
    from conftest import tiny_tokenizer

    return tiny_tokenizer()


def test_the_standins_have_the_hubs_columns_labels_and_splits(hub_dir: Path) -> None:
    import datasets

    for name, splits in (
        ("mnli", ("train", "validation_matched", "validation_mismatched")),
        ("qqp", ("train", "validation")),
        ("qnli", ("train", "validation")),
    ):
        task = get_task(name)
        for split in splits:
            ds = datasets.load_dataset(str(hub_dir), name, split=split)
            assert ds.features == hub_features(task) and len(ds) > 0
            assert set(ds["label"]) <= set(range(task.num_labels))
    mnli = datasets.load_dataset(str(hub_dir), "mnli", split="train")
    assert set(mnli["label"]) == {0, 1, 2}
    real = {sentence for sentence in SENTENCES}
    assert set(mnli["premise"]) <= real | {s for s in mnli["premise"]}  # real sentences of the GLUE folder
    assert any(p in real for p in mnli["premise"])


def test_mnli_trains_through_the_hub_code_and_reports_both_dev_sets(
    tiny_model_dir: Path, hub_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            "task=mnli",
            "method=vanilla_kd",
            "data.source=hub",
            f"data.hub_dataset={hub_dir}",
            f"teacher.name_or_path={tiny_model_dir}",
            "teacher.epochs=1",
            "teacher.batch_size=4",
            "data.batch_size=4",
            "data.max_length=32",
            "student.num_layers=2",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    results = run(cfg, tmp_path / "run")
    assert {"val/accuracy", "val_mismatched/accuracy"} <= set(results["metrics"])
    assert {"val/accuracy", "val_mismatched/accuracy"} <= set(results["teacher_metrics"])
    columns = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val/accuracy" in columns and "val_mismatched/accuracy" in columns


def test_qqp_reports_accuracy_and_f1(tiny_model_dir: Path, hub_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "task=qqp",
            "method=finetune",
            "data.source=hub",
            f"data.hub_dataset={hub_dir}",
            f"teacher.name_or_path={tiny_model_dir}",
            "teacher.epochs=1",
            "data.batch_size=4",
            "data.max_length=32",
            "student.num_layers=2",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    metrics = run(cfg, tmp_path / "run")["metrics"]
    assert {"val/accuracy", "val/f1", "val/combined_score"} <= set(metrics)
    assert metrics["val/combined_score"] == pytest.approx((metrics["val/accuracy"] + metrics["val/f1"]) / 2)


# --------------------------------------------------------------------------- no GLUE folder, no Hub


def test_without_a_glue_folder_or_the_hub_sst2_comes_from_the_shipped_slice_and_says_so(
    hub_cache: None, caplog: pytest.LogCaptureFixture
) -> None:
    source = DataSource.from_config("auto", None)
    with caplog.at_level(logging.WARNING, logger="kdexp.data"):
        train, dev = (load_split(get_task("sst2"), split, source) for split in ("train", "validation"))
    assert (len(train), len(dev)) == (2000, 872)
    assert "using the SST-2 slice shipped with kdexp" in caplog.text
    shared = Path(__file__).resolve().parents[2] / "shared" / "glue_data"
    if shared.is_dir():  # the slice is the first 2,000 rows of the real training set, and the whole dev set
        assert train.to_dict() == load_split(get_task("sst2"), "train", DataSource(shared), 2000).to_dict()


def test_a_task_with_no_data_source_says_where_data_comes_from_in_one_line(hub_cache: None) -> None:
    with pytest.raises(DataError) as err:
        load_split(get_task("rte"), "train", DataSource.from_config("auto", None))
    message = str(err.value)
    assert "GLUE_DIR" in message and "data.hub_dataset" in message and "task=custom" in message and "\n" not in message
