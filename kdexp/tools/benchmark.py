"""Training throughput, as ratios measured in one process on one machine.

    python -m kdexp.tools.benchmark task=sst2 data.max_train_samples=512 data.max_length=64

Each variant is a set of config overrides run through the framework's own trainer (one
epoch, validation off); `bare_loop` is a plain PyTorch loop doing the work of `finetune`
(same student, batches, AdamW + linear schedule, gradient clipping). Variants run
interleaved, `--repeats` times; the median examples/s is reported with these ratios:
KD with cached teacher logits vs fine-tuning, live teacher vs cached, kdexp vs bare loop.
Each measurement also records the peak memory it added (the least over repeats): on GPU the allocator's peak, on CPU
the peak resident set (VmHWM, reset before each variant through /proc/self/clear_refs) above
the resident set at its start.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytorch_lightning as pl
import torch

from kdexp.context import RunContext
from kdexp.data import make_loader
from kdexp.losses import task_loss
from kdexp.methods.base import DistillationModule
from kdexp.model_internals import model_inputs
from kdexp.models import build_student
from kdexp.resident_memory import status_kb
from kdexp.run import build_context, build_module, compose_config, student_source, trainer_options
from kdexp.training import GlueDataModule, ThroughputMeter

ModelT = TypeVar("ModelT", bound=torch.nn.Module)

DEFAULT_VARIANTS = {
    "finetune": ["method=finetune"],
    "vanilla_kd": ["method=vanilla_kd"],
    "vanilla_kd_live_teacher": ["method=vanilla_kd", "method.live_teacher=true"],
}
DEFAULT_RATIOS = [
    ("vanilla_kd / finetune", "vanilla_kd", "finetune"),
    ("vanilla_kd live teacher / cached", "vanilla_kd_live_teacher", "vanilla_kd"),
    ("kdexp finetune / bare PyTorch loop", "finetune", "bare_loop"),
]


class PeakMemory:
    """Peak memory (MB) added while the block runs: CUDA allocator peak, or the process's peak RSS on Linux."""

    _start: int | None  # allocated bytes (CUDA) or RSS in kB when the block began; None: no peak to read

    def __enter__(self) -> "PeakMemory":
        self.megabytes = float("nan")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _reset_peak_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._start is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.megabytes = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self.megabytes = (status_kb("VmHWM") - self._start) / 1024


def _reset_peak_rss() -> int | None:
    """Reset VmHWM to the current RSS (Linux); returns that RSS in kB, or None where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_kb("VmRSS")
    except (OSError, KeyError):
        return None


def lightning_examples_per_second(
    context: RunContext, method_cls: type, options: dict[str, Any], module: DistillationModule | None = None
) -> float:
    """One epoch through Lightning, validation off; ``module`` (else one built from the run) is trained in place."""
    module = module if module is not None else build_module(context, method_cls, options)
    meter = ThroughputMeter()
    trainer_cfg = trainer_options(context.cfg)
    trainer_cfg.update(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer = pl.Trainer(callbacks=[meter], **trainer_cfg)
    data_cfg = context.cfg.data
    # The run's own data module, so that data options (group_by_length) reach the measurement.
    datamodule = GlueDataModule(
        context.data,
        data_cfg.batch_size,
        data_cfg.eval_batch_size,
        context.cfg.seed,
        group_by_length=bool(data_cfg.group_by_length),
    )
    trainer.fit(module, datamodule=datamodule)
    return meter.examples_per_second


def adamw_as_kdexp(named_parameters: Any, optim: Any) -> torch.optim.AdamW:
    """The optimiser of `DistillationModule.configure_optimizers`, for loops outside Lightning:
    AdamW, no weight decay on biases and LayerNorm weights."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    named = list(named_parameters)
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": optim.weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ],
        lr=optim.learning_rate,
        eps=optim.adam_epsilon,
    )


def moved_to(model: ModelT, device: torch.device) -> ModelT:
    """``model.to(device)``, typed as the model (mypy misreads the signature of ``PreTrainedModel.to``)."""
    model.to(device)  # a module moves in place
    return model


def bare_loop_examples_per_second(context: RunContext) -> float:
    """The work of `finetune` without the framework: forward, CE, backward, clip, AdamW, schedule."""
    from transformers import get_linear_schedule_with_warmup

    cfg = context.cfg
    device = context.hardware.device
    torch.manual_seed(cfg.seed)
    student = moved_to(build_student(cfg.student, student_source(cfg, context.teacher), context.task), device).train()
    optimizer = adamw_as_kdexp(student.named_parameters(), cfg.optim)
    loader = make_loader(context.data.train, context.data, cfg.data.batch_size, True, cfg.seed)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * len(loader)), len(loader))
    examples = 0
    start = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with context.hardware.autocast():
            logits = student(**model_inputs(batch, student)).logits
        loss = task_loss(logits, batch["labels"], context.task.is_regression)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.trainer.get("gradient_clip_val") or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        examples += batch["input_ids"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return examples / (time.perf_counter() - start)


def benchmark(common: list[str], variants: dict[str, list[str]], repeats: int, bare_loop: bool) -> dict[str, Any]:
    runners: dict[str, Callable[[], float]] = {}
    for name, overrides in variants.items():
        context, cls, options = build_context(compose_config(common + overrides), Path("."))
        runners[name] = partial(lightning_examples_per_second, context, cls, options)
    if bare_loop:
        context, _, _ = build_context(compose_config(common + ["method=finetune"]), Path("."))
        runners["bare_loop"] = partial(bare_loop_examples_per_second, context)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, measure in runners.items():  # interleaved, so drift in machine load hits all alike
            with PeakMemory() as peak:
                samples[name].append(measure())
            peaks[name].append(peak.megabytes)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "common_overrides": common,
        "variants": variants,
        "repeats": repeats,
        "examples_per_second": medians,
        "samples": samples,
        # min over repeats: the first repeat of a variant may include one-off stages (a teacher, an MLM store)
        "peak_memory_mb": {name: min(values) for name, values in peaks.items()},
        "device": _device_name(),
    }


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides common to every variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=override[,override...]; replaces the default variants"
    )
    parser.add_argument("--ratio", action="append", default=[], help="LABEL=NUMERATOR/DENOMINATOR")
    parser.add_argument("--no-bare-loop", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    variants = DEFAULT_VARIANTS
    if args.variant:
        variants = {v.split("=", 1)[0]: v.split("=", 1)[1].split(",") for v in args.variant}
    ratios = (
        DEFAULT_RATIOS if not args.ratio else [(r.split("=", 1)[0], *r.split("=", 1)[1].split("/")) for r in args.ratio]
    )
    result = benchmark(["logger=none", *args.overrides], variants, args.repeats, not args.no_bare_loop)
    speeds = result["examples_per_second"]
    result["ratios"] = {label: speeds[a] / speeds[b] for label, a, b in ratios if a in speeds and b in speeds}
    print(f"device: {result['device']}; overrides: {' '.join(args.overrides)}; median of {args.repeats}")
    for name, value in speeds.items():
        print(f"  {name:32s} {value:8.1f} examples/s   peak memory +{result['peak_memory_mb'][name]:.0f} MB")
    for label, value in result["ratios"].items():
        print(f"  {label:40s} {value:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
