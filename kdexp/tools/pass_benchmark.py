"""Teacher passes against bare PyTorch loops doing the same work, as ratios from one process.

    python -m kdexp.tools.pass_benchmark task=sst2 data.max_train_samples=4000 teacher.max_train_samples=2000

Two passes over the run's training rows with its (cached or trained) teacher:
- logits: kdexp's pass (`Teacher._compute_logits`, the one that fills the logit cache) against a
  bare loop in length-sorted batches of 128 rows under `torch.inference_mode`, and the same
  bare loop in file order (how the pass ran before it sorted);
- decisions: kdexp's DBKD query pass (`DecisionTeacher.decide` over each row and its EDA
  copies, as `method=dbkd` builds them) against a bare loop that tokenises every query, sorts
  by token count and runs batches of 128.
Each pass runs `--repeats` times, interleaved; the median rows/s is reported, with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kdexp.data import pad_batch
from kdexp.decision.queries import QueryConfig, augment_examples, examples_of
from kdexp.decision.teacher import DecisionTeacher, Query
from kdexp.model_internals import model_inputs
from kdexp.run import build_context, compose_config

BARE_BATCH = 128


def _rows_per_second(rows: int, work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return rows / (time.perf_counter() - started)


def bare_logits(model: PreTrainedModel, tokenized: Any, pad_token_id: int, sort: bool) -> torch.Tensor:
    examples = [tokenized[i] for i in range(len(tokenized))]
    order = (
        sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        if sort
        else list(range(len(examples)))
    )
    num_labels = model.config.num_labels
    assert num_labels is not None  # a classifier's config names its labels (id2label)
    out = torch.empty(len(examples), num_labels)
    with torch.inference_mode():
        for start in range(0, len(order), BARE_BATCH):
            rows = order[start : start + BARE_BATCH]
            batch = pad_batch([examples[r] for r in rows], pad_token_id)
            out[torch.tensor(rows)] = model(**model_inputs(batch)).logits
    return out


def bare_decisions(model: PreTrainedModel, tokenizer: Any, queries: Sequence[Query], max_length: int) -> torch.Tensor:
    pairs = not isinstance(queries[0], str)
    encoded = (
        tokenizer([q[0] for q in queries], [q[1] for q in queries], truncation=True, max_length=max_length)
        if pairs
        else tokenizer(list(queries), truncation=True, max_length=max_length)
    )
    order = sorted(range(len(queries)), key=lambda i: len(encoded["input_ids"][i]))
    out = torch.empty(len(queries), dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(order), BARE_BATCH):
            rows = order[start : start + BARE_BATCH]
            batch = tokenizer.pad({k: [v[r] for r in rows] for k, v in encoded.items()}, return_tensors="pt")
            out[torch.tensor(rows)] = model(**batch).logits.argmax(-1)
    return out


def benchmark(overrides: list[str], repeats: int, num_queries: int) -> dict[str, Any]:
    context, _, _ = build_context(compose_config(["logger=none", "method=finetune", *overrides]), Path("."))
    teacher, data = context.teacher, context.data
    tokenized = data.train
    model = teacher.load_model()
    queries: list[Query] = []
    for original, copies in zip(
        examples_of(data.raw[context.task.train_split], context.task),
        augment_examples(
            examples_of(data.raw[context.task.train_split], context.task), QueryConfig(num_queries=num_queries)
        ),
    ):
        queries += [original, *copies]
    decision_teacher = DecisionTeacher.from_teacher(teacher, data.max_length)
    passes: dict[str, tuple[int, Callable[[], Any]]] = {
        "logits_kdexp": (len(tokenized), lambda: teacher._compute_logits(tokenized, data)),
        "logits_bare_sorted": (len(tokenized), lambda: bare_logits(model, tokenized, data.pad_token_id, True)),
        "logits_bare_file_order": (len(tokenized), lambda: bare_logits(model, tokenized, data.pad_token_id, False)),
        "decisions_kdexp": (len(queries), lambda: decision_teacher.decide(queries)),
        "decisions_bare_sorted": (
            len(queries),
            lambda: bare_decisions(model, teacher.tokenizer, queries, data.max_length),
        ),
    }
    agree = {
        "logits_max_abs_difference": float(
            (teacher._compute_logits(tokenized, data) - bare_logits(model, tokenized, data.pad_token_id, True))
            .abs()
            .max()
        ),
        "decisions_equal_fraction": float(
            (decision_teacher.decide(queries) == bare_decisions(model, teacher.tokenizer, queries, data.max_length))
            .float()
            .mean()
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, (rows, work) in passes.items():
            samples[name].append(_rows_per_second(rows, work))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {
        "kdexp logits pass / bare length-sorted loop": medians["logits_kdexp"] / medians["logits_bare_sorted"],
        "bare file order / bare length-sorted": medians["logits_bare_file_order"] / medians["logits_bare_sorted"],
        "kdexp decision queries / bare length-sorted loop": medians["decisions_kdexp"]
        / medians["decisions_bare_sorted"],
    }
    return {
        "overrides": overrides,
        "repeats": repeats,
        "rows": len(tokenized),
        "queries": len(queries),
        "rows_per_second": medians,
        "samples": samples,
        "ratios": ratios,
        "agreement": agree,
        "threads": torch.get_num_threads(),
        "device": str(teacher.hardware.device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (task, slice, teacher)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-queries", type=int, default=10, help="queries per row in the decision pass")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    result = benchmark(args.overrides, args.repeats, args.num_queries)
    print(f"{result['rows']} rows, {result['queries']} queries, {result['threads']} threads; median of {args.repeats}")
    for name, value in result["rows_per_second"].items():
        print(f"  {name:28s} {value:8.1f} rows/s")
    for label, value in {**result["ratios"], **result["agreement"]}.items():
        print(f"  {label:50s} {value:.4g}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
