"""How far apart a multiple-choice model scores each question's options: per question the spread of its option
logits (the largest minus the smallest), summed up over the first dev questions beside the accuracy. A model
whose training loss sits at ln C (C options) is either still at its start or has collapsed to scoring every
option alike; the spread tells which, from a model folder or from a training step checkpoint (`last.ckpt`, a
teacher's or a student's: a student cut from the first layers is scored with as many layers as it holds).

    MRC_DIR=../shared/mrc_data python -m kdexp.tools.mc_spread task=dream data.max_length=256 \\
        --checkpoint outputs/cache/teachers/dream-<key>.partial/checkpoints/last.ckpt --questions 200

Without `--checkpoint` it scores `teacher.name_or_path` as it is: on a pre-trained model, a fresh head drawn
with `teacher.seed` as the teacher stage draws it, so the spread where the teacher's fine-tuning starts. The overrides compose like `kdexp-train`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kdexp.data import DataSource, InputForm, load_split, pad_batch, tokenize_split
from kdexp.errors import ConfigError
from kdexp.families import input_form
from kdexp.models import load_classifier, load_tokenizer, resolve_model_path, select_layers, state_depth
from kdexp.run import compose_config, task_from_config
from kdexp.seeding import seed_all
from kdexp.tasks import MULTIPLE_CHOICE

CHECKPOINT_PREFIX = "student."  # the fine-tuned model's name inside a kdexp training module


def with_checkpoint_weights(model: PreTrainedModel, checkpoint: Path) -> PreTrainedModel:
    """`model` holding the weights of a kdexp training checkpoint (every one of them must fit); for a student with
    fewer layers than `model` (student=first_layers or every_nth_layer), `model` cut to that many layers first."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}
    if not weights:
        raise ConfigError(f"{checkpoint} holds no '{CHECKPOINT_PREFIX}*' weights: give a kdexp training checkpoint.")
    depth = state_depth(weights)
    if depth < model.config.num_hidden_layers:
        model = select_layers(model, list(range(depth)))
    model.load_state_dict(weights)
    return model


@torch.no_grad()
def option_logits(model: Any, rows: Any, pad_token_id: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's option logits ``[N, C]`` for tokenised multiple-choice rows, and their labels ``[N]``."""
    model.eval()
    logits, labels = [], []
    for start in range(0, len(rows), batch_size):
        batch = pad_batch([rows[i] for i in range(start, min(start + batch_size, len(rows)))], pad_token_id)
        labels.append(batch.pop("labels"))
        batch.pop("idx")
        logits.append(model(**batch).logits.float())
    return torch.cat(logits), torch.cat(labels)


def spread_summary(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and the per-question spread (max - min of the option logits): median, mean and smallest."""
    spreads = (logits.max(dim=-1).values - logits.min(dim=-1).values).tolist()
    return {
        "questions": len(spreads),
        "accuracy": float((logits.argmax(dim=-1) == labels).float().mean()),
        "spread_median": statistics.median(spreads),
        "spread_mean": statistics.fmean(spreads),
        "spread_min": min(spreads),
    }


def mc_spread(overrides: list[str], checkpoint: Path | None, questions: int) -> dict[str, Any]:
    cfg = compose_config(["logger=none", *overrides])
    task = task_from_config(cfg.task)
    if task.family != MULTIPLE_CHOICE:
        raise ConfigError(f"task={task.name} is not multiple choice; give task=dream, task=race or one's own MC files.")
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"--checkpoint {checkpoint} is not a file; give a last.ckpt of a kdexp run or teacher.")
    path = resolve_model_path(cfg.teacher.name_or_path, "teacher.name_or_path")
    tokenizer = load_tokenizer(path, "teacher.name_or_path")
    seed_all(int(cfg.teacher.seed))  # a fresh head as the teacher stage draws it: its starting point
    model = load_classifier(path, task)
    if checkpoint is not None:
        model = with_checkpoint_weights(model, checkpoint)
    source = DataSource.from_config(cfg.data.source, cfg.data.glue_dir, cfg.data.hub_dataset, cfg.data.mrc_dir)
    split = task.eval_splits[0]
    raw = load_split(task, split, source, questions)
    inputs = InputForm(input_form(model.config))
    rows, _ = tokenize_split(raw, task, tokenizer, int(cfg.data.max_length), Path(cfg.cache_dir), inputs)
    logits, labels = option_logits(model, rows, tokenizer.pad_token_id or 0)
    return {
        "task": task.name,
        "split": split,
        "model": str(checkpoint or path),
        "max_length": int(cfg.data.max_length),
        **spread_summary(logits, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for kdexp-train (task=dream ...)")
    parser.add_argument("--checkpoint", type=Path, help="a kdexp training checkpoint (last.ckpt) to score")
    parser.add_argument("--questions", type=int, default=200, help="the first N dev questions")
    args = parser.parse_args()
    print(json.dumps(mc_spread(args.overrides, args.checkpoint, args.questions), indent=2))


if __name__ == "__main__":
    main()
