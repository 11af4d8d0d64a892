"""Teacher passes in length-sorted batches under a token budget: the plan, and results in row order."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from kdexp.decision.teacher import DecisionTeacher
from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, length_sorted_batches
from kdexp.tasks import get_task
from kdexp.teacher import Teacher
from tests.conftest import SENTENCES, tiny_tokenizer


@pytest.mark.parametrize("tokens,rows", [(64, 128), (20, 3), (7, 100), (1, 5)])
def test_batches_hold_every_row_once_longest_first_within_the_budget_and_full(tokens: int, rows: int) -> None:
    rng = random.Random(tokens)
    lengths = [rng.randint(1, 30) for _ in range(200)]
    batching = PassBatching(tokens, rows)
    batches = length_sorted_batches(lengths, batching)
    assert sorted(r for batch in batches for r in batch) == list(range(len(lengths)))
    flat = [lengths[r] for batch in batches for r in batch]
    assert flat == sorted(lengths, reverse=True)
    for batch, following in zip(batches, batches[1:] + [None]):
        longest = max(lengths[r] for r in batch)
        assert len(batch) == 1 or (len(batch) <= rows and len(batch) * longest <= tokens)
        if following:  # full: the next row would break a limit
            assert len(batch) == rows or (len(batch) + 1) * longest > tokens


def tiny_teacher(model_dir: Path, tmp_path: Path, tokens: int, rows: int) -> Teacher:
    task = get_task("sst2")
    return Teacher(
        str(model_dir),
        "k",
        task,
        tiny_tokenizer(),
        tmp_path,
        Hardware(),
        eval_batch_size=rows,
        eval_tokens_per_batch=tokens,
    )


def test_logits_pass_equals_each_row_run_alone_in_row_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    texts = [SENTENCES[i % len(SENTENCES)] + " good" * (i % 7) for i in range(40)]
    encoded = tokenizer(texts)
    tokenized = datasets.Dataset.from_dict({**encoded, "idx": list(range(len(texts)))})
    teacher = tiny_teacher(tiny_model_dir, tmp_path, tokens=48, rows=8)
    logits = teacher._compute_logits(tokenized, SimpleNamespace(pad_token_id=tokenizer.pad_token_id, max_length=64))

    model = teacher.load_model()
    with torch.no_grad():
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in texts])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    assert not logits.is_inference()  # usable by training code outside inference mode


def test_decisions_are_each_querys_own_argmax_in_input_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    queries = [SENTENCES[i % len(SENTENCES)] + " bad" * (i % 5) for i in range(30)]
    teacher = tiny_teacher(tiny_model_dir, tmp_path, tokens=40, rows=4)
    decisions = DecisionTeacher.from_teacher(teacher, max_length=32).decide(queries)
    model = teacher.load_model()
    with torch.no_grad():
        alone = torch.stack([model(**tokenizer([q], return_tensors="pt")).logits.argmax(-1)[0] for q in queries])
    assert torch.equal(decisions, alone)
