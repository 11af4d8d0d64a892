"""kdexp's vanilla KD against a peer toolkit (TextBrewer's BasicDistiller) on the same work.

    pip install --no-deps textbrewer==0.2.1 tensorboard absl-py   # the peer; not a kdexp dependency
    OMP_NUM_THREADS=1 python -m kdexp.tools.peer_benchmark task=sst2 data.max_train_samples=4000 \\
        data.max_length=64 teacher.max_train_samples=2000 --seeds 1,2,3

Both start from the same student initialisation (the run's student), train one epoch on the
same tokenised rows with the same teacher, and are scored on the full dev split with the
same function. The peer runs with its own settings: AdamW at a constant learning rate, no
warm-up, no gradient clipping, logits cached by its own pass before training
(`is_caching_logits`), rows padded to `data.max_length` as its GLUE examples build them (and,
as a second variant, padded per batch as kdexp pads them), Hinton's loss mapped onto its options: kd_loss_type='ce',
kd_loss_weight = alpha·T², hard_label_weight = 1 - alpha (its CE against the teacher's soft
labels differs from the KL by the teacher's entropy, a constant). kdexp runs `vanilla_kd` with
the same optimiser settings (`optim.lr_scheduler=constant optim.warmup_ratio=0
trainer.gradient_clip_val=null`), in random batches and with `data.group_by_length=true`.

Examples/s count training steps only (kdexp: the epoch, as `kdexp.tools.benchmark`; the peer: its
training loop, its logits-caching pass excluded). Every variant runs once per seed, the variants
of a seed in turn (the seed sets the student's classifier initialisation, the batch order and the
dropout masks: each toolkit draws them its own way); reported: the median examples/s and the
mean ± std dev accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from kdexp.context import RunContext
from kdexp.data import make_loader
from kdexp.model_internals import model_inputs
from kdexp.run import build_context, build_module, compose_config
from kdexp.tools.benchmark import adamw_as_kdexp, lightning_examples_per_second

KDEXP_PEER_SETTINGS = [
    "method=vanilla_kd",
    "optim.lr_scheduler=constant",
    "optim.warmup_ratio=0",
    "trainer.gradient_clip_val=null",
]


@torch.inference_mode()
def dev_accuracy(student: torch.nn.Module, context: RunContext) -> float:
    """Accuracy of ``student`` on the task's first dev split (the same function for every variant)."""
    split = context.data.eval_splits[0]
    loader = make_loader(context.data.tokenized[split], context.data, context.cfg.data.eval_batch_size, False)
    was_training = student.training
    student.eval()
    correct = total = 0
    for batch in loader:
        logits = student(**model_inputs(batch, student)).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    student.train(was_training)
    return correct / total


def kdexp_run(context: RunContext, method_cls: type, options: Any, initial: dict) -> tuple[float, float]:
    context.student.load_state_dict(initial)
    module = build_module(context, method_cls, options)
    speed = lightning_examples_per_second(context, method_cls, options, module=module)
    return speed, dev_accuracy(module.student, context)


def peer_run(context: RunContext, initial: dict, pad_to_max_length: bool) -> tuple[float, float]:
    """TextBrewer's BasicDistiller, one epoch, the peer's own loop and logits cache.

    ``pad_to_max_length``: every row padded to ``data.max_length``, as the peer's GLUE examples
    build their features; otherwise each batch padded to its longest row (kdexp's collation).
    """
    import textbrewer

    cfg, method = context.cfg, context.cfg.method
    student = copy.deepcopy(context.student)
    student.load_state_dict(initial)
    student.train()
    teacher = context.teacher.load_model().eval()
    optimizer = adamw_as_kdexp(student.named_parameters(), cfg.optim)
    rows = context.data.tokenized[context.task.train_split]
    loader = [
        {
            k: _padded(v, cfg.data.max_length, context.data.pad_token_id if k == "input_ids" else 0)
            if pad_to_max_length and v.dim() == 2
            else v
            for k, v in batch.items()
            if k != "idx"
        }
        for batch in make_loader(rows, context.data, cfg.data.batch_size, True, cfg.seed)
    ]

    class TimedDistiller(textbrewer.BasicDistiller):
        caching_seconds = 0.0

        def cache_logits(self, *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            super().cache_logits(*args, **kwargs)
            self.caching_seconds += time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        distiller = TimedDistiller(
            textbrewer.TrainingConfig(
                device="cpu" if not torch.cuda.is_available() else "cuda", output_dir=folder, log_dir=folder
            ),
            textbrewer.DistillationConfig(
                temperature=method.temperature,
                kd_loss_type="ce",
                kd_loss_weight=method.alpha * method.temperature**2,
                hard_label_weight=1 - method.alpha,
                is_caching_logits=True,
            ),
            teacher,
            student,
            adaptor_T=lambda batch, output: {"logits": output.logits},
            adaptor_S=lambda batch, output: {"logits": output.logits, "losses": output.loss},
        )
        started = time.perf_counter()
        distiller.train(optimizer, loader, num_epochs=1, max_grad_norm=-1.0)
        seconds = time.perf_counter() - started - distiller.caching_seconds
    return len(rows) / seconds, dev_accuracy(student, context)


def _padded(values: torch.Tensor, length: int, pad_value: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, length - values.shape[1]), value=pad_value)


def benchmark(common: list[str], seeds: list[int]) -> dict[str, Any]:
    """Every variant once per seed (the seed sets the student's head, the batch order and dropout)."""
    runners: list[tuple[str, Callable[[], tuple[float, float]]]] = []
    for seed in seeds:
        settings = common + KDEXP_PEER_SETTINGS + [f"seed={seed}"]
        context, method_cls, options = build_context(compose_config(settings), Path("."))
        grouped, _, grouped_options = build_context(compose_config(settings + ["data.group_by_length=true"]), Path("."))
        initial = copy.deepcopy(context.student.state_dict())
        runners += [
            ("kdexp_vanilla_kd", partial(kdexp_run, context, method_cls, options, initial)),
            ("kdexp_vanilla_kd_grouped", partial(kdexp_run, grouped, method_cls, grouped_options, initial)),
            ("textbrewer_padded_to_max_length", partial(peer_run, context, initial, pad_to_max_length=True)),
            ("textbrewer_padded_per_batch", partial(peer_run, context, initial, pad_to_max_length=False)),
        ]
    speeds: dict[str, list[float]] = defaultdict(list)
    accuracies: dict[str, list[float]] = defaultdict(list)
    for name, measure in runners:  # seed by seed, the variants of a seed in turn
        speed, accuracy = measure()
        speeds[name].append(speed)
        accuracies[name].append(100 * accuracy)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    peer, peer_per_batch = medians["textbrewer_padded_to_max_length"], medians["textbrewer_padded_per_batch"]
    return {
        "common_overrides": common,
        "kdexp_settings": KDEXP_PEER_SETTINGS,
        "seeds": seeds,
        "train_rows": len(context.data.tokenized[context.task.train_split]),
        "examples_per_second": medians,
        "samples": dict(speeds),
        "dev_accuracy_mean": {name: statistics.fmean(v) for name, v in accuracies.items()},
        "dev_accuracy_std": {name: statistics.stdev(v) if len(v) > 1 else 0.0 for name, v in accuracies.items()},
        "dev_accuracy_samples": dict(accuracies),
        "ratios": {
            "kdexp random batches / peer padded to max_length": medians["kdexp_vanilla_kd"] / peer,
            "kdexp group_by_length / peer padded to max_length": medians["kdexp_vanilla_kd_grouped"] / peer,
            "kdexp random batches / peer padded per batch": medians["kdexp_vanilla_kd"] / peer_per_batch,
            "kdexp group_by_length / peer padded per batch": medians["kdexp_vanilla_kd_grouped"] / peer_per_batch,
        },
        "device": f"cpu ({torch.get_num_threads()} threads)"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (task, data slice, teacher, student)")
    parser.add_argument("--seeds", default="1,2,3", help="one run of every variant per seed")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    result = benchmark(["logger=none", *args.overrides], seeds)
    print(
        f"device: {result['device']}; overrides: {' '.join(args.overrides)}; {result['train_rows']} rows, "
        f"seeds {args.seeds} (examples/s: median; dev accuracy: mean ± std)"
    )
    for name, value in result["examples_per_second"].items():
        print(
            f"  {name:32s} {value:8.1f} examples/s   dev accuracy {result['dev_accuracy_mean'][name]:.1f} "
            f"± {result['dev_accuracy_std'][name]:.1f}"
        )
    for label, value in result["ratios"].items():
        print(f"  {label:52s} {value:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
