"""A decoder decision teacher's answers and its off-label count, computed with `DEVICES` processes (CPU, gloo);
used by tests/test_hardware.py.

    python tests/ddp_label_words.py OUT GPT2_DIR DEVICES

Global rank 0 writes OUT/answers.pt: the decisions on the queries of `queries()` and the tally of queries
whose top next token was no label word. Lightning's launcher starts the other processes by running this
script again.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdexp.decision.teacher import DecisionTeacher, _make_decider
from kdexp.families import multiple_choice
from kdexp.families.label_words import LabelWordChoiceModel, label_word_ids
from kdexp.hardware import Hardware, HardwareSpec
from kdexp.inference import PassBatching
from kdexp.tasks import get_task

WORDS = ["the", "movie", "is", "good", "bad", "fun", "dull", "great", "a", "film", "was", "it", "not"]


def queries(count: int = 30) -> list[tuple[str, ...]]:
    """(passage, question, option, option, option) of random lengths, the same in every process."""
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return [(words(rng.randrange(3, 12)), words(3), words(1), words(2), words(1)) for _ in range(count)]


def label_word_model(folder: str) -> LabelWordChoiceModel:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LabelWordChoiceModel(
        AutoModelForCausalLM.from_pretrained(folder), label_word_ids(tokenizer, multiple_choice.label_words(3))
    ).eval()


def main(out: Path, folder: str, devices: int) -> None:
    hardware = Hardware(HardwareSpec(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto"))
    hardware.launch()
    tally: dict[str, int] = {}
    # A small token budget, so that the queries fall into many batches to share out.
    decide = _make_decider(
        lambda: label_word_model(folder),
        AutoTokenizer.from_pretrained(folder),
        64,
        PassBatching(96, 3),
        hardware,
        get_task("dream"),
        "prompt",
        tally,
    )
    decisions = DecisionTeacher(decide, "tiny-gpt2", 3, hardware=hardware).decide(queries())
    if hardware.is_global_zero:
        torch.save({"decisions": decisions, "off_label": torch.tensor(tally["off_label"])}, out / "answers.pt")


if __name__ == "__main__":
    out_dir, model, count = sys.argv[1:4]
    main(Path(out_dir), model, int(count))
