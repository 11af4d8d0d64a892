"""Full size at bounded cost: fingerprints and lengths without per-row Python, DBKD queries in chunks that
resume after a kill."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import pytest
import torch

from kdexp.data import DataSource, content_fingerprint, load_split, row_lengths, tokenize_split
from kdexp.decision import queries as queries_module
from kdexp.decision.queries import QueryConfig, query_decisions
from kdexp.decision.teacher import DecisionTeacher
from kdexp.tasks import get_task


def row_by_row_digest(ds: datasets.Dataset, columns: tuple[str, ...]) -> str:
    """The fingerprint as a plain loop over the rows computes it (the reference)."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update(column.encode())
        for row in range(len(ds)):
            digest.update(repr(ds[row][column]).encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:20]


def test_the_fingerprint_is_the_row_by_row_digest_also_of_a_selection() -> None:
    texts = ["plain", 'it\'s "quoted"', "tab\there", "naïve café", "", "x" * 300, "new\nline"]
    ds = datasets.Dataset.from_dict({"sentence": texts, "label": list(range(len(texts)))})
    for view in (ds, ds.select([5, 1, 3]), ds.shuffle(seed=0)):
        assert content_fingerprint(view, ("sentence", "label")) == row_by_row_digest(view, ("sentence", "label"))


def test_row_lengths_are_the_token_counts(glue_dir: Path, tmp_path: Path) -> None:
    from conftest import tiny_tokenizer

    task = get_task("rte")
    tokenized, _ = tokenize_split(
        load_split(task, "train", DataSource(glue_dir)), task, tiny_tokenizer(), 32, tmp_path / "cache"
    )
    for view in (tokenized, tokenized.select([3, 0, 7])):
        assert row_lengths(view).tolist() == [len(view[i]["input_ids"]) for i in range(len(view))]


# --------------------------------------------------------------------------- the query stage in chunks


def counting_teacher(answered: list[int], fail_on_call: int | None = None) -> DecisionTeacher:
    """A black box whose answer depends on the query's text (words mod 2); it can fail on its n-th call."""

    def decide(batch):
        if fail_on_call is not None and len(answered) == fail_on_call:
            raise RuntimeError("killed")
        answered.append(len(batch))
        words = [len(q.split()) if isinstance(q, str) else len(q[0].split()) + 2 * len(q[1].split()) for q in batch]
        return torch.tensor([w % 2 for w in words], dtype=torch.long)

    return DecisionTeacher(decide, key="counting", num_labels=2, identity={"rule": "words mod 2"})


def test_queries_in_chunks_equal_one_pass_and_a_killed_stage_resumes_from_its_last_chunk(
    glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = get_task("rte")
    ds = load_split(task, "train", DataSource(glue_dir))
    config = QueryConfig(num_queries=4, seed=3)
    whole = query_decisions(counting_teacher([]), ds, task, config, tmp_path / "one-chunk")

    monkeypatch.setattr(queries_module, "CHUNK_ROWS", 5)  # 12 rows: chunks of 5, 5 and 2
    with pytest.raises(RuntimeError, match="killed"):
        query_decisions(counting_teacher([], fail_on_call=2), ds, task, config, tmp_path / "chunks")
    partial = next((tmp_path / "chunks" / "signals" / "decisions").glob("*.partial"))
    assert sorted(p.name for p in partial.iterdir()) == ["rows-0-5.pt", "rows-5-10.pt"]

    answered: list[int] = []
    resumed = query_decisions(counting_teacher(answered), ds, task, config, tmp_path / "chunks")
    assert answered == [2 * config.num_queries]  # only the last chunk was asked
    assert torch.equal(resumed.decisions, whole.decisions) and resumed.key != whole.key  # the plan is in the key
    assert not partial.exists()  # the chunks go once the table is stored
    copies = [datasets.load_from_disk(str(q.copies_path)).to_dict() for q in (whole, resumed)]
    assert copies[0] == copies[1]  # the copies made in chunks are the ones made at once


@pytest.mark.parametrize("pairs", [False, True])
def test_packed_queries_pad_to_what_the_tokenizer_pads(pairs: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import SENTENCES, tiny_tokenizer

    from kdexp.decision import teacher as teacher_module
    from kdexp.decision.teacher import encode_queries

    monkeypatch.setattr(teacher_module, "ENCODE_BATCH", 5)  # several tokenizer calls
    tokenizer = tiny_tokenizer()
    queries = list(zip(SENTENCES, SENTENCES[::-1])) if pairs else list(SENTENCES)
    encoded = encode_queries(tokenizer, queries, 8, with_segments=pairs)
    for rows in ([0, 1, 2], [11, 3, 7, 5], list(range(12))):
        chosen = [queries[r] for r in rows]
        texts = [chosen] if not pairs else [[q[0] for q in chosen], [q[1] for q in chosen]]
        expected = tokenizer(*texts, truncation=True, max_length=8, padding=True, return_tensors="pt")
        batch = encoded.batch(rows, tokenizer.pad_token_id)
        assert set(batch) == (
            {"input_ids", "attention_mask", "token_type_ids"} if pairs else {"input_ids", "attention_mask"}
        )
        for name, value in batch.items():
            assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_peak_memory_of_the_streamed_stages_stays_level_as_the_rows_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenising, the teacher's logits and DBKD's queries (N = 10) stream in chunks: from 4,000 to
    16,000 rows each stage's peak RSS, in its own process as the scale benchmark measures it, grows by
    less than 100 MB. The queries run in chunks of 2,000 rows here (20,000 by default) so that both
    sizes are past one chunk; held all at once, the 120,000 extra queries would add about 180 MB."""
    from conftest import SHARED_GLUE

    from kdexp.tools import scale_benchmark

    monkeypatch.setenv(scale_benchmark.QUERY_CHUNK_ROWS_VARIABLE, "2000")
    stages = ("tokenise", "logits", "queries")
    small, large = (scale_benchmark.measure_size(rows, tmp_path, SHARED_GLUE, stages) for rows in (4000, 16000))
    for stage in stages:
        growth = large[stage]["peak_rss_mb"] - small[stage]["peak_rss_mb"]
        assert growth < 100, f"{stage}: {small[stage]} -> {large[stage]}"


def test_the_multiple_choice_stand_in_repeats_dreams_questions_to_the_size_asked(tmp_path: Path) -> None:
    """`--task dream`: a DREAM-release folder of N training questions, one per item, the release's in order and
    then again, read through the task's own reader as the stages read it."""
    import json

    from conftest import SHARED_GLUE, SHARED_MRC

    from kdexp.tools import scale_benchmark

    if not SHARED_MRC.is_dir():
        pytest.skip("needs ../shared/mrc_data")
    release = json.loads((SHARED_MRC / "dream" / "train.json").read_text())
    questions = [(turns, q) for turns, qs, _ in release for q in qs]
    size = len(questions) + 5  # past the release: its first questions come again
    scale_benchmark.prepare(tmp_path, SHARED_GLUE, size, "dream", SHARED_MRC)
    task, source = scale_benchmark._task_and_source(tmp_path)
    train = load_split(task, task.train_split, source)
    assert len(train) == size and task.name == "dream"
    for row, (turns, question) in ((0, questions[0]), (size - 1, questions[4])):
        assert train[row]["context"] == "\n".join(turns) and train[row]["choices"] == question["choice"]
        assert train[row]["label"] == question["choice"].index(question["answer"])
    assert len(load_split(task, "validation", source)) == scale_benchmark.DEV_QUESTIONS


def test_a_stage_process_reports_its_own_peak_not_its_parents(tmp_path: Path) -> None:
    """Linux carries a forked parent's size into its child's rusage peak across `exec`; the figure the
    scale benchmark records is the child's own (VmHWM). A parent holding 400 MB starts a child that
    allocates 100 MB: the child's own peak is near 100 MB plus the interpreter, the rusage figure is not."""
    import resource
    import subprocess
    import sys

    held = bytearray(400 * 2**20)
    held[::4096] = b"\x01" * len(range(0, len(held), 4096))  # touched, so resident
    child = (
        "from kdexp.resident_memory import own_peak_rss_mb\n"
        "block = bytearray(100 * 2**20); block[::4096] = b'\\x01' * len(range(0, len(block), 4096))\n"
        "print(own_peak_rss_mb())"
    )
    own = float(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
    carried = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    del held
    assert 100 <= own < 200, own
    assert carried >= 400, carried  # what the benchmark recorded before: the parent's size
