"""The MLM adaptation step with the vocabulary projection at masked positions only, against every position.

    OMP_NUM_THREADS=1 python -m kdexp.tools.mlm_benchmark --task rte --rows 256 --steps 40

Text smoothing's MLM adaptation trains an MLM head (and the encoder) on the task's text. Its loss
needs the vocabulary logits only where tokens are masked (about 15%), so kdexp projects only
there (`kdexp.smoothing.mlm.masked_lm_loss_and_predictions`); `all_positions` is the way it ran
before, `BertForMaskedLM(..., labels=...)`, which projects every position to the vocabulary.
Both variants start from the same weights and take the same batches (same masks), one step of
each in turn, with the adaptation stage's optimiser and settings; reported: seconds per step
(median over the steps after the first), the peak memory each added, the largest loss difference
over the steps, and the held-out masked-token accuracy after the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from kdexp.data import DataSource, arrow_column, load_split
from kdexp.models import load_tokenizer, resolve_model_path
from kdexp.smoothing.mlm import (
    MaskedBatch,
    _fixed_masked_batches,
    _masked_lm_from_encoder,
    _parameter_groups,
    _split_heldout,
    evaluate_masked_lm,
    masked_lm_loss_and_predictions,
)
from kdexp.tasks import get_task
from kdexp.tools.benchmark import PeakMemory


def all_positions_loss(model: Any, batch: MaskedBatch) -> Tensor:
    """The loss as Hugging Face's head computes it: logits at every position, CE where labelled."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        token_type_ids=batch.token_type_ids,
        labels=batch.labels,
    ).loss


def masked_positions_loss(model: Any, batch: MaskedBatch) -> Tensor:
    return masked_lm_loss_and_predictions(model, batch)[0]


def adaptation_texts(task_name: str, rows: int, glue_dir: str | None) -> list[Any]:
    task = get_task(task_name)
    raw = load_split(task, task.train_split, DataSource.from_config("auto", glue_dir), rows)
    columns = [arrow_column(raw, name).to_pylist() for name in task.text_fields]
    return list(zip(*columns)) if len(columns) > 1 else columns[0]


def benchmark(
    encoder: str,
    task_name: str,
    rows: int,
    steps: int,
    batch_size: int,
    max_length: int,
    glue_dir: str | None,
    seed: int = 0,
) -> dict[str, Any]:
    path = resolve_model_path(encoder, "--encoder")
    tokenizer = load_tokenizer(path, "--encoder")
    texts = adaptation_texts(task_name, rows, glue_dir)
    heldout, train = _split_heldout(texts, tokenizer, max_length, 0.1, seed)
    heldout_batches = _fixed_masked_batches(heldout, tokenizer, batch_size, 0.15, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    order = [
        i
        for _ in range(steps * batch_size // len(train) + 1)
        for i in torch.randperm(len(train), generator=generator).tolist()
    ]
    batches = [
        train.masked_batch(order[s * batch_size : (s + 1) * batch_size], tokenizer, 0.15, generator)
        for s in range(steps)
    ]

    variants: dict[str, Callable[[Any, MaskedBatch], Tensor]] = {
        "all_positions": all_positions_loss,
        "masked_positions": masked_positions_loss,
    }
    models, optimizers, rng_states = {}, {}, {}
    for name in variants:
        torch.manual_seed(seed)
        models[name], _ = _masked_lm_from_encoder(path, tokenizer)
        models[name].train()  # train_encoder=true, the default of method.mlm.adapt
        optimizers[name] = torch.optim.AdamW(_parameter_groups(models[name], True, 1e-3, 1e-4))
        rng_states[name] = torch.random.get_rng_state()  # each variant draws the same dropout masks
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {name: 0.0 for name in variants}
    for batch in batches:
        for name, loss_of in variants.items():  # the same batch for both, in turn
            torch.random.set_rng_state(rng_states[name])
            with PeakMemory() as peak:
                started = time.perf_counter()
                loss = loss_of(models[name], batch)
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                seconds[name].append(time.perf_counter() - started)
            rng_states[name] = torch.random.get_rng_state()
            peaks[name] = max(peaks[name], peak.megabytes)
            losses[name].append(loss.item())
    per_step = {name: statistics.median(values[1:] or values) for name, values in seconds.items()}
    accuracy = {
        name: evaluate_masked_lm(model, heldout_batches)["masked_token_accuracy"] for name, model in models.items()
    }
    return {
        "encoder": path,
        "task": task_name,
        "texts": len(texts),
        "train_texts": len(train),
        "heldout_texts": len(heldout),
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "seconds_per_step": per_step,
        "speedup": per_step["all_positions"] / per_step["masked_positions"],
        "peak_memory_mb": peaks,
        "heldout_masked_token_accuracy": accuracy,
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["all_positions"], losses["masked_positions"])),
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoder", default="minilm-l6", help="a checkpoint folder or Hub name (default: the MiniLM-L6 package)"
    )
    parser.add_argument("--task", default="rte")
    parser.add_argument("--rows", type=int, default=256, help="the first N training rows are the texts")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--glue-dir", default=None, help="local GLUE folder (default: GLUE_DIR)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    result = benchmark(
        args.encoder,
        args.task,
        args.rows,
        args.steps,
        args.batch_size,
        args.max_length,
        args.glue_dir or os.environ.get("GLUE_DIR"),
    )
    print(
        f"{result['task']}: {result['train_texts']} training texts, {result['steps']} steps of {result['batch_size']}, "
        f"length {result['max_length']}, {result['threads']} thread(s)"
    )
    for name, value in result["seconds_per_step"].items():
        print(
            f"  {name:18s} {value:6.2f} s/step   peak memory +{result['peak_memory_mb'][name]:.0f} MB   "
            f"held-out masked-token accuracy {100 * result['heldout_masked_token_accuracy'][name]:.1f}"
        )
    print(
        f"  speed-up {result['speedup']:.2f}x; largest loss difference over the steps {result['max_loss_difference']:.2e}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
