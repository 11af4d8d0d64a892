"""Cache keys, atomic writes, and corrupt or mismatched entries being recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdexp.cache import atomic_directory, atomic_write_json, cache_key, load_tensors, save_tensors


def test_cache_key_is_stable_and_order_independent() -> None:
    a = cache_key(model="m", task="sst2", hp={"lr": 1e-5, "epochs": 3})
    assert a == cache_key(task="sst2", hp={"epochs": 3, "lr": 1e-5}, model="m")
    assert len(a) == 20 and int(a, 16) >= 0


@pytest.mark.parametrize(
    "change", [dict(model="m2"), dict(task="rte"), dict(hp={"lr": 2e-5, "epochs": 3}), dict(slice=100)]
)
def test_any_changed_input_changes_the_key(change: dict) -> None:
    base = dict(model="m", task="sst2", hp={"lr": 1e-5, "epochs": 3}, slice=None)
    assert cache_key(**base) != cache_key(**{**base, **change})


def test_tensors_round_trip_with_their_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    save_tensors(path, {"logits": torch.arange(6.0).view(3, 2)}, {"key": "k", "rows": 3})
    got = load_tensors(path, {"key": "k", "rows": 3})
    assert got is not None and torch.equal(got["logits"], torch.arange(6.0).view(3, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left behind


def test_mismatched_entry_is_not_trusted_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    save_tensors(path, {"logits": torch.zeros(3, 2)}, {"key": "k", "rows": 3})
    assert load_tensors(path, {"key": "k", "rows": 4}) is None
    assert not path.exists()


def test_corrupt_entry_is_not_trusted_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    save_tensors(path, {"logits": torch.zeros(300, 2)}, {"key": "k"})
    path.write_bytes(path.read_bytes()[:100])  # a truncated write from another tool
    assert load_tensors(path, {"key": "k"}) is None
    assert not path.exists()


def test_atomic_directory_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_text("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"


def test_atomic_json_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"b":2}'


def test_exclusive_lock_serialises_processes(tmp_path: Path) -> None:
    import multiprocessing as mp

    from kdexp.cache import exclusive_lock

    log = tmp_path / "log.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_under_lock, args=(tmp_path / "x.lock", log, i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = log.read_text().split()
    # each process writes "start-i end-i" with a sleep between: never interleaved under the lock
    assert len(lines) == 6
    assert all(lines[k].split("-")[1] == lines[k + 1].split("-")[1] for k in range(0, 6, 2))
    with exclusive_lock(tmp_path / "x.lock"):
        pass


def _append_under_lock(lock: Path, log: Path, i: int) -> None:
    import time

    from kdexp.cache import exclusive_lock

    with exclusive_lock(lock):
        with open(log, "a") as f:
            f.write(f"start-{i}\n")
            f.flush()
            time.sleep(0.2)
            f.write(f"end-{i}\n")


def test_load_or_compute_computes_once_across_parallel_jobs(tmp_path: Path) -> None:
    """Four jobs that need the same artifact at once: one computes it, the other three wait and read it."""
    import threading
    import time

    from kdexp.cache import load_or_compute

    path = tmp_path / "artifact.pt"
    computed: list[int] = []
    results: list[torch.Tensor] = []

    def load() -> torch.Tensor | None:
        cached = load_tensors(path, {"key": "k"})
        return None if cached is None else cached["value"]

    def compute() -> torch.Tensor:
        computed.append(1)
        time.sleep(0.3)  # long enough that every other job arrives while this one holds the lock
        value = torch.arange(3.0)
        save_tensors(path, {"value": value}, {"key": "k"})
        return value

    jobs = [threading.Thread(target=lambda: results.append(load_or_compute(path, load, compute))) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(computed) == 1
    assert len(results) == 4 and all(torch.equal(r, torch.arange(3.0)) for r in results)


def test_tokenizers_that_differ_only_in_segment_ids_have_different_fingerprints() -> None:
    """Two tokenizers with one vocabulary, one giving segment ids (BERT, ELECTRA) and one not (RoBERTa's
    inputs): their tokenised rows differ in columns, so a shared cache must not hand one the other's. A BERT
    tokenizer's fingerprint is unchanged (its cached splits stay valid)."""
    import hashlib

    from kdexp.data import tokenizer_fingerprint
    from kdexp.tiny_models import word_tokenizer

    words = ["the", "a", "film", "good", "bad"]
    with_segments, without = word_tokenizer(words, "electra"), word_tokenizer(words, "roberta")
    assert "token_type_ids" in with_segments.model_input_names and "token_type_ids" not in without.model_input_names
    assert tokenizer_fingerprint(with_segments) != tokenizer_fingerprint(without)
    bert = word_tokenizer(words, "bert")
    digest = hashlib.sha256(repr(sorted(bert.get_vocab().items())).encode())
    digest.update(type(bert).__name__.encode())
    digest.update(repr(getattr(bert, "do_lower_case", None)).encode())
    assert tokenizer_fingerprint(bert) == digest.hexdigest()[:20]  # as computed before segment ids counted
