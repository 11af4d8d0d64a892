"""Loading each task's classic TSV layout, bad-input errors, the tokenisation cache, batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdexp import data as data_mod
from kdexp.data import DataError, DataSource, load_split, load_task_data, pad_batch, tokenize_split
from kdexp.tasks import TASKS, get_task
from tests.conftest import SENTENCES, tiny_tokenizer, write_tsv

LOCAL_TASKS = ["sst2", "cola", "mrpc", "stsb", "rte", "wnli"]


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_every_local_task_loads_with_hub_column_names(glue_dir: Path, name: str) -> None:
    task = get_task(name)
    train = load_split(task, "train", DataSource(glue_dir))
    assert train.column_names == list(task.text_fields) + ["label"]
    assert len(train) == len(SENTENCES)
    assert train[task.text_fields[0]][0] == SENTENCES[0]  # the MRPC byte-order mark is not part of the text
    dev = load_split(task, "validation", DataSource(glue_dir))
    assert len(dev) == 6


def test_label_values_are_mapped_to_hub_label_ids(glue_dir: Path) -> None:
    rte = load_split(get_task("rte"), "train", DataSource(glue_dir))
    # entailment -> 0, not_entailment -> 1 as in nyu-mll/glue
    assert rte["label"][:4] == [0, 1, 0, 1]
    stsb = load_split(get_task("stsb"), "train", DataSource(glue_dir))
    assert stsb["label"][:3] == pytest.approx([0.0, 0.8, 1.6])
    cola = load_split(get_task("cola"), "validation", DataSource(glue_dir))
    assert cola["label"][:2] == [0, 1]


def test_every_glue_task_is_registered_with_its_metrics() -> None:
    glue = {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert set(TASKS) == glue | {"dream", "race", "squad", "squad_v2"}
    assert {name for name, task in TASKS.items() if task.family == "classification"} == glue
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mrpc").main_metric == "combined_score"
    assert get_task("cola").main_metric == "matthews_correlation"


def test_unknown_task_names_the_key_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown GLUE task 'sst3'.*task.name.*sst2"):
        get_task("sst3")


def test_glue_dir_without_the_task_files_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no RTE/train.tsv for task rte"):
        load_split(get_task("rte"), "train", DataSource(tmp_path / "empty"))


def test_missing_glue_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        DataSource.from_config("auto", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="GLUE_DIR"):
        DataSource.from_config("local", None)
    assert DataSource.from_config("auto", None).glue_dir is None  # the Hub


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2/train.tsv", [["sentence", "label"], ["good", "1"], ["no label field"]])
    with pytest.raises(DataError, match=r"SST-2/train.tsv:3: malformed row"):
        load_split(get_task("sst2"), "train", DataSource(tmp_path))


def test_label_outside_the_label_set_names_file_line_and_set(tmp_path: Path) -> None:
    write_tsv(
        tmp_path / "RTE/train.tsv",
        [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"], ["1", "a", "b", "maybe"]],
    )
    with pytest.raises(
        DataError,
        match=r"RTE/train.tsv:3: label 'maybe' is not in the label set of task rte \(entailment, not_entailment\)",
    ):
        load_split(get_task("rte"), "train", DataSource(tmp_path))


def test_unmatched_quotes_are_kept_verbatim(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2/train.tsv", [["sentence", "label"], ['he said " hello', "1"], ["plain", "0"]])
    ds = load_split(get_task("sst2"), "train", DataSource(tmp_path))
    assert ds["sentence"] == ['he said " hello', "plain"]


def test_slice_takes_the_first_rows(glue_dir: Path) -> None:
    ds = load_split(get_task("sst2"), "train", DataSource(glue_dir), max_samples=5)
    assert ds["sentence"] == SENTENCES[:5]


def test_tokenisation_is_cached_and_reused(glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("mrpc")
    raw = load_split(task, "train", DataSource(glue_dir))
    tok = tiny_tokenizer()
    first, key = tokenize_split(raw, task, tok, 32, tmp_path / "cache")
    assert (tmp_path / "cache" / "tokenized" / key).is_dir()
    calls = []
    monkeypatch.setattr(type(raw), "map", lambda *a, **k: calls.append(1))
    again, key2 = tokenize_split(raw, task, tok, 32, tmp_path / "cache")
    assert key2 == key and calls == []
    assert again["input_ids"] == first["input_ids"]
    expected = tok(raw["sentence1"][0], raw["sentence2"][0], truncation=True, max_length=32)["input_ids"]
    assert first["input_ids"][0] == expected
    assert first["idx"] == list(range(len(raw)))
    monkeypatch.undo()
    # a different max length or content gives a different key
    assert tokenize_split(raw, task, tok, 16, tmp_path / "cache")[1] != key


def test_pad_batch_pads_to_the_longest_row() -> None:
    examples = [
        {"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0], "labels": 1, "idx": 4},
        {"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 0], "labels": 0, "idx": 7},
    ]
    batch = pad_batch(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["idx"].tolist() == [4, 7]
    assert pad_batch(examples, 0, regression=True)["labels"].dtype.is_floating_point


def test_task_data_has_every_eval_split(glue_dir: Path, tmp_path: Path) -> None:
    data = load_task_data(get_task("sst2"), DataSource(glue_dir), tiny_tokenizer(), 32, tmp_path / "c", 8, 4)
    assert len(data.train) == 8 and len(data.tokenized["validation"]) == 4
    assert set(data.keys) == {"train", "validation"}


def test_real_glue_dev_sizes_when_shared_data_is_present() -> None:
    from tests.conftest import SHARED_GLUE

    if not SHARED_GLUE.is_dir():
        pytest.skip("../shared/glue_data not beside the repository")
    sizes = {"sst2": 872, "cola": 1043, "mrpc": 408, "stsb": 1500, "rte": 277, "wnli": 71}
    for name, size in sizes.items():
        assert len(load_split(get_task(name), "validation", DataSource(SHARED_GLUE))) == size, name
    assert data_mod.DataSource.from_config("auto", str(SHARED_GLUE)).glue_dir == SHARED_GLUE


# --------------------------------------------------------------------------- bad input, refused with one line


def test_byte_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "SST-2/train.tsv"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9 food\t0\n")
    with pytest.raises(
        DataError, match=r"SST-2/train.tsv:3: not valid UTF-8 \(byte 0xe9 at byte 4 .*\); save the file as UTF-8\.$"
    ):
        load_split(get_task("sst2"), "train", DataSource(tmp_path))
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\n\xff\t1\n")  # a byte-order mark does not shift the count
    with pytest.raises(DataError, match=r"SST-2/train.tsv:2: not valid UTF-8 \(byte 0xff at byte 1 "):
        load_split(get_task("sst2"), "train", DataSource(tmp_path))


@pytest.mark.parametrize(
    ("name", "file", "expected"),
    [
        ("sst2", "SST-2/train.tsv", "a header line with the columns sentence, label and tab-separated rows"),
        ("cola", "CoLA/train.tsv", r"tab-separated rows without a header \(sentence in column 4, label in column 2\)"),
    ],
)
def test_empty_file_is_refused_with_what_it_should_hold(tmp_path: Path, name: str, file: str, expected: str) -> None:
    (tmp_path / file).parent.mkdir(parents=True)
    (tmp_path / file).write_text("")
    with pytest.raises(DataError, match=rf"{file}: is empty; expected {expected}\.$"):
        load_split(get_task(name), "train", DataSource(tmp_path))


def test_header_without_rows_is_refused(tmp_path: Path) -> None:
    write_tsv(tmp_path / "SST-2/train.tsv", [["sentence", "label"]])
    with pytest.raises(
        DataError,
        match=r"SST-2/train.tsv: has a header but no rows; expected a header line with the columns sentence, label and tab-separated rows",
    ):
        load_split(get_task("sst2"), "train", DataSource(tmp_path))


def test_split_of_blank_rows_is_refused_before_tokenising(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2/train.tsv").write_text("sentence\tlabel\n\n  \n\n")
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA/train.tsv").write_text("\n\t\n\n")
    for name, file in (("sst2", "SST-2/train.tsv"), ("cola", "CoLA/train.tsv")):
        with pytest.raises(DataError, match=rf"{file}: (has a header but no rows|is empty)"):
            load_task_data(get_task(name), DataSource(tmp_path), tiny_tokenizer(), 32, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_empty_hub_split_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(
        data_mod,
        "_hub_split",
        lambda task, split, hub_dataset: datasets.Dataset.from_dict({"sentence": [], "label": []}),
    )
    with pytest.raises(
        DataError, match=r"hub:nyu-mll/glue/sst2 split 'train': no rows for task sst2; use data with rows"
    ):
        load_split(get_task("sst2"), "train", DataSource(None))


def test_hub_rows_without_a_valid_label_are_named_as_a_row_loop_finds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    labels = [0, 1, -1, 1, 2, None, 0, 7] + [1] * 50
    expected = [i for i, y in enumerate(labels) if y is None or not 0 <= y < 2]
    rows = datasets.Dataset.from_dict({"sentence": ["a film"] * len(labels), "label": labels})
    assert data_mod.invalid_label_rows(rows, 2).tolist() == expected == [2, 4, 5, 7]
    assert data_mod.invalid_label_rows(rows.select([0, 1, 3, 6]), 2).tolist() == []  # a selection's own rows
    monkeypatch.setattr(data_mod, "_hub_split", lambda task, split, hub_dataset: rows)
    with pytest.raises(DataError, match=r"^hub:nyu-mll/glue sst2/train: rows \[2, 4, 5, 7\] have no valid label\.$"):
        load_split(get_task("sst2"), "train", DataSource(None))


@pytest.mark.parametrize("bad", [0, -3])
def test_max_samples_below_one_names_the_key(glue_dir: Path, tmp_path: Path, bad: int) -> None:
    sst2, source = get_task("sst2"), DataSource(glue_dir)
    with pytest.raises(DataError, match=rf"^data.max_train_samples={bad}: must be a positive number of rows or null"):
        load_split(sst2, "train", source, max_samples=bad)
    with pytest.raises(DataError, match=rf"^data.max_eval_samples={bad}: must be a positive number of rows or null"):
        load_split(sst2, "validation", source, max_samples=bad)
    with pytest.raises(DataError, match=rf"^teacher.max_train_samples={bad}: "):
        load_split(sst2, "train", source, max_samples=bad, samples_key="teacher.max_train_samples")
    with pytest.raises(DataError, match=rf"^data.max_eval_samples={bad}: "):
        load_task_data(sst2, source, tiny_tokenizer(), 32, tmp_path / "cache", 8, bad)
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode with empty caches: what a machine without network access sees (and fast)."""
    import datasets
    import huggingface_hub.constants

    for module, name in (
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ):
        monkeypatch.setattr(module, name, True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_unreachable_hub_without_glue_dir_says_how_to_use_local_files(unreachable_hub: None) -> None:
    source = DataSource.from_config("auto", None)
    with pytest.raises(
        DataError,
        match=r"Hub could not be reached for nyu-mll/glue/rte .*GLUE_DIR=<folder> or data.glue_dir=<folder> with the classic GLUE layout",
    ):
        load_split(get_task("rte"), "train", source)
