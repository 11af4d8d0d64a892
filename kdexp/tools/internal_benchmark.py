"""Throughput of internal distillation against a bare PyTorch loop, and what each teacher signal costs.

    python -m kdexp.tools.internal_benchmark task=sst2 data.max_train_samples=256 student.num_layers=3 --repeats 2
    python -m kdexp.tools.internal_benchmark --components task=sst2 data.max_train_samples=256 student.num_layers=3

The first form runs, interleaved and ``--repeats`` times, one training epoch of: the
framework's ``finetune``, ``vanilla_kd`` and ``internal_all`` (its first epoch is the
attention stage: eager teacher forward with attentions + eager student forward/backward +
attention KL + [CLS] cosine + soft-label KD), ``internal_all`` with ``attention_weight=0``
with the teacher's [CLS] vectors cached and live, and two bare PyTorch loops: the
foundation's finetune loop (``kdexp.tools.benchmark``) and :func:`bare_internal_loop_examples_per_second`,
which does the work of the ``internal_all`` attention stage without Lightning. It prints
the median examples/s and the ratios.

``--components`` times the pieces of one step on the run's first batches instead (teacher
forward with SDPA / with hidden states / eager with attentions, student forward+backward
with SDPA / eager, a cached [CLS] lookup) and the sizes a cache of each signal would take.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, cast

import torch

from kdexp.data import make_loader
from kdexp.internal.layer_map import resolve_layer_map
from kdexp.internal.losses import InternalProjections, internal_terms, internal_weights
from kdexp.losses import hinton_weights, kd_terms, weighted_sum
from kdexp.losses.features import HeadMismatch
from kdexp.methods.internal import InternalOptions
from kdexp.model_internals import forward_with_internals, truncated_encoder
from kdexp.models import build_student
from kdexp.run import RunContext, build_context, compose_config, resolve_method, student_source
from kdexp.tools.benchmark import (
    adamw_as_kdexp,
    bare_loop_examples_per_second,
    lightning_examples_per_second,
    moved_to,
)

VARIANTS = {
    "finetune": ["method=finetune"],
    "vanilla_kd": ["method=vanilla_kd"],
    "internal_all": ["method=internal_all"],
    "internal_all_cls_cached": ["method=internal_all", "method.attention_weight=0", "method.teacher_cls_cache=auto"],
    "internal_all_cls_live": ["method=internal_all", "method.attention_weight=0", "method.teacher_cls_cache=never"],
}
RATIOS = [
    ("internal_all (attention stage) / bare loop", "internal_all", "bare_internal_all"),
    ("internal_all / vanilla_kd", "internal_all", "vanilla_kd"),
    ("internal_all / finetune", "internal_all", "finetune"),
    ("vanilla_kd / finetune", "vanilla_kd", "finetune"),
    ("[CLS]-only stage: cached / live teacher", "internal_all_cls_cached", "internal_all_cls_live"),
    ("kdexp finetune / bare finetune loop", "finetune", "bare_finetune"),
]


def _device(context: RunContext) -> torch.device:
    return context.hardware.device


def _method_options(context: RunContext) -> InternalOptions:
    _, options = resolve_method(context.cfg.method)
    assert isinstance(options, InternalOptions), "the internal benchmark needs method=internal_*"
    return options


def bare_internal_loop_examples_per_second(context: RunContext) -> float:
    """The ``internal_all`` attention stage without the framework, from the same building blocks.

    Per batch: teacher forward under ``no_grad`` with eager (pre-dropout) attention and hidden
    states; student forward with eager attention; attention KL + [CLS] cosine (+ hidden MSE
    if weighted) at every matched pair; soft-label KD from the cached logits when
    ``kd_in_internal_stages``; backward; gradient clipping; AdamW over student and
    projections (the framework's parameter groups); linear warm-up/decay over the epoch.
    """
    from transformers import get_linear_schedule_with_warmup

    cfg, options = context.cfg, _method_options(context)
    device = _device(context)
    torch.manual_seed(cfg.seed)
    student = moved_to(build_student(cfg.student, student_source(cfg, context.teacher), context.task), device).train()
    teacher = moved_to(context.teacher.load_model(), device)
    teacher_logits = context.teacher.logits(context.data, context.task.train_split).to(device)
    pairs = resolve_layer_map(options.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    projections = InternalProjections(pairs, student.config.hidden_size, teacher.config.hidden_size).to(device)
    weights = internal_weights(pairs, options.attention_weight, options.cls_weight, options.hidden_mse_weight)
    kinds = sorted({name.split("/")[0] for name in weights}, key=("attention_kl", "cls_cosine", "hidden_mse").index)
    with_kd = options.kd_in_internal_stages
    if with_kd:
        weights.update(hinton_weights(options.alpha))
    need_attentions = options.attention_weight != 0
    teacher_depth = max(p.teacher for p in pairs) + 1

    optimizer = adamw_as_kdexp([*student.named_parameters(), *projections.named_parameters()], cfg.optim)
    loader = make_loader(context.data.train, context.data, cfg.data.batch_size, True, cfg.seed)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * len(loader)), len(loader))
    parameters = [*student.parameters(), *projections.parameters()]
    clip = cfg.trainer.get("gradient_clip_val") or float("inf")
    examples = 0
    start = time.perf_counter()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.no_grad(), truncated_encoder(teacher, teacher_depth):
            teacher_out = forward_with_internals(teacher, batch, need_attentions=need_attentions)
        student_out = forward_with_internals(student, batch, need_attentions=need_attentions)
        # Both forwards keep their hidden states (forward_with_internals' need_hidden_states defaults to True).
        assert student_out.hidden_states is not None and teacher_out.hidden_states is not None
        terms = internal_terms(
            pairs,
            student_out.hidden_states,
            teacher_out.hidden_states,
            batch["attention_mask"],
            projections,
            student_out.attentions,
            teacher_out.attentions,
            kinds,
            cast(HeadMismatch, options.head_mismatch),  # InternalOptions.check refused any other
        )
        if with_kd:
            terms.update(
                kd_terms(
                    student_out.logits,
                    teacher_logits[batch["idx"]],
                    batch["labels"],
                    options.temperature,
                    context.task.is_regression,
                )
            )
        loss = weighted_sum(terms, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        examples += batch["input_ids"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return examples / (time.perf_counter() - start)


# ---------------------------------------------------------------------- per-step components


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def components(context: RunContext, num_batches: int = 6) -> dict[str, Any]:
    """Median seconds per batch of each piece of an internal step, and the sizes of cacheable signals."""
    cfg, options = context.cfg, _method_options(context)
    device = _device(context)
    torch.manual_seed(cfg.seed)
    student = moved_to(build_student(cfg.student, student_source(cfg, context.teacher), context.task), device).train()
    teacher = moved_to(context.teacher.load_model(), device)
    pairs = resolve_layer_map(options.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    teacher_layers = sorted({p.teacher for p in pairs})
    loader = make_loader(context.data.train, context.data, cfg.data.batch_size, True, cfg.seed)
    fake_cache = torch.randn(len(context.data.train), len(teacher_layers), teacher.config.hidden_size)

    def student_step(eager: bool) -> None:
        out = forward_with_internals(student, batch, need_attentions=eager)
        assert out.hidden_states is not None
        loss = out.logits.float().sum() + sum(h[:, 0].sum() for h in out.hidden_states[1:])
        if eager:
            assert out.attentions is not None
            loss = loss + sum(a.sum() for a in out.attentions)
        loss.backward()
        student.zero_grad(set_to_none=True)

    pieces: dict[str, Callable[[], Any]] = {
        "teacher_forward_sdpa_logits_only": lambda: teacher(**_inputs(batch)),
        "teacher_forward_sdpa_hidden_states": lambda: forward_with_internals(teacher, batch, need_attentions=False),
        "teacher_forward_eager_attentions": lambda: forward_with_internals(teacher, batch, need_attentions=True),
        "student_forward_backward_sdpa": lambda: student_step(False),
        "student_forward_backward_eager_attentions": lambda: student_step(True),
        "cached_cls_lookup": lambda: fake_cache[batch["idx"].cpu()].to(device),
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    attention_bytes: list[int] = []
    examples = 0
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        examples += batch["input_ids"].shape[0]
        lengths = batch["attention_mask"].sum(dim=1)
        heads = teacher.config.num_attention_heads
        attention_bytes.extend(int(len(teacher_layers) * heads * n * n * 4) for n in lengths.tolist())
        for name, fn in pieces.items():
            with torch.no_grad() if name.startswith(("teacher", "cached")) else nullcontext():
                times[name].append(_timed(fn, device))
    batch_size = cfg.data.batch_size
    n_train = len(context.data.train)
    cls_bytes_per_example = len(teacher_layers) * teacher.config.hidden_size * 4
    mean_attention_bytes = statistics.mean(attention_bytes)
    return {
        "batches": min(num_batches, len(loader)),
        "batch_size": batch_size,
        "matched_teacher_layers": teacher_layers,
        "seconds_per_batch_median": {name: statistics.median(v) for name, v in times.items()},
        "cls_cache_bytes_per_example": cls_bytes_per_example,
        "cls_cache_bytes_train_split": cls_bytes_per_example * n_train,
        "attention_maps_bytes_per_example_mean_unpadded": mean_attention_bytes,
        "attention_maps_bytes_train_split_unpadded": mean_attention_bytes * n_train,
        "train_rows": n_train,
    }


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


# ---------------------------------------------------------------------- command line


def run_benchmark(
    common: list[str], repeats: int, variants: dict[str, list[str]], bare_finetune: bool = True
) -> dict[str, Any]:
    runners: dict[str, Callable[[], float]] = {}
    for name, overrides in variants.items():
        context, cls, options = build_context(compose_config(common + overrides), Path("."))
        runners[name] = partial(lightning_examples_per_second, context, cls, options)
    internal, _, _ = build_context(compose_config(common + ["method=internal_all"]), Path("."))
    runners["bare_internal_all"] = lambda: bare_internal_loop_examples_per_second(internal)
    if bare_finetune:
        finetune, _, _ = build_context(compose_config(common + ["method=finetune"]), Path("."))
        runners["bare_finetune"] = lambda: bare_loop_examples_per_second(finetune)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, measure in runners.items():  # interleaved: drift in machine load hits all alike
            samples[name].append(measure())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {label: medians[a] / medians[b] for label, a, b in RATIOS if a in medians and b in medians}
    # Ratios within each repeat (the two runs were close in time), then their median: less
    # sensitive to load that drifts between repeats on a shared machine.
    paired = {
        label: statistics.median(x / y for x, y in zip(samples[a], samples[b]))
        for label, a, b in RATIOS
        if a in samples and b in samples
    }
    return {
        "common_overrides": common,
        "repeats": repeats,
        "examples_per_second": medians,
        "samples": samples,
        "ratios": ratios,
        "paired_ratios": paired,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides common to every variant")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--components", action="store_true", help="time the pieces of one step instead")
    parser.add_argument("--batches", type=int, default=6, help="batches timed with --components")
    parser.add_argument("--only", default=None, help="comma-separated subset of the Lightning variants")
    parser.add_argument("--no-bare-finetune", action="store_true", help="skip the foundation's finetune bare loop")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    common = ["logger=none", *args.overrides]
    if args.components:
        context, _, _ = build_context(compose_config(common + ["method=internal_all"]), Path("."))
        result = components(context, args.batches)
        result["common_overrides"] = common
        print(json.dumps(result, indent=2))
    else:
        variants = VARIANTS if not args.only else {k: VARIANTS[k] for k in args.only.split(",")}
        result = run_benchmark(common, args.repeats, variants, not args.no_bare_finetune)
        print(f"cpu threads {result['threads']}; overrides: {' '.join(args.overrides)}; median of {args.repeats}")
        for name, value in result["examples_per_second"].items():
            print(f"  {name:32s} {value:8.1f} examples/s   samples {[round(v, 1) for v in result['samples'][name]]}")
        for label, value in result["ratios"].items():
            print(
                f"  {label:44s} {value:.3f} (ratio of medians)   {result['paired_ratios'][label]:.3f} (median of per-repeat ratios)"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
