"""The MLM teacher of text smoothing: load one with its MLM head, or adapt one (once per key), and
cache its top-k token distributions on the training split.

- `prepare_mlm_teacher`: the MLM (``method.mlm.name_or_path``, default the teacher's pre-trained
  checkpoint), loaded with its head by `load_mlm_teacher`, which refuses a foreign vocabulary.
  A checkpoint without MLM head weights is refused (`MissingMLMHeadError`) unless
  ``mlm.adapt.enabled``: then the adaptation stage (`adapt_mlm_head`, optionally training the
  encoder) runs once per key (encoder fingerprint, task, training texts, hyper-parameters,
  seed) and is stored under ``<cache_dir>/mlm/<task>-<key>`` with its held-out masked-token
  accuracy.
- `cached_topk_store`: the top-k ``q_t`` of the whole training split, computed once per (MLM key,
  tokenised split key, ``tau``, ``k``) and stored as float16 probabilities + int32 ids (6·k
  bytes per real token; `kdexp.smoothing.store`).
- `choose_distribution_source`: cached or live, by the store's size.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kdexp.cache import (
    atomic_directory,
    atomic_write_json,
    cache_key,
    load_or_compute,
    load_or_compute_together,
    load_tensors,
    save_tensors,
)
from kdexp.data import DataSource, arrow_column, content_fingerprint, load_split, row_lengths, tokenizer_fingerprint
from kdexp.hardware import Hardware
from kdexp.inference import PassBatching, length_sorted_loader
from kdexp.models import model_fingerprint, resolve_model_path
from kdexp.preemption import CheckpointEvery
from kdexp.smoothing.mlm import AdaptationCheckpoints, MissingMLMHeadError, adapt_mlm_head, load_mlm_teacher
from kdexp.smoothing.store import TopKTokenStore, build_topk_store, store_bytes
from kdexp.tasks import EXTRACTIVE_QA, MULTIPLE_CHOICE

if TYPE_CHECKING:
    from kdexp.context import RunContext

log = logging.getLogger(__name__)

DISTRIBUTION_SOURCES = ("auto", "cached", "live")
MLM_INFO_FILE = "mlm.json"


# --------------------------------------------------------------------------- the MLM teacher


@dataclass
class MLMAdaptSettings:
    """``method.mlm.adapt``: the MLM adaptation stage for encoders shipped without an MLM head."""

    enabled: bool = True
    train_encoder: bool = True
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3  # the head
    encoder_learning_rate: float = 1e-4
    max_length: Optional[int] = None  # null: data.max_length
    mask_prob: float = 0.15
    heldout_fraction: float = 0.1
    max_texts: Optional[int] = None  # null: the run's training rows; N: the first N rows of the task's training split
    seed: int = 0
    passes: Optional[float] = None  # a budget in passes over the training texts, capped at `steps`; null: `steps`

    def key_parts(self, max_length: int) -> dict[str, Any]:
        parts = {k: v for k, v in asdict(self).items() if k not in ("enabled", "max_texts")}
        if self.passes is None:
            del parts["passes"]  # keys made before the option existed stay valid
        parts["max_length"] = max_length
        return parts

    def budget_steps(self, num_texts: int) -> int:
        """Optimiser steps: `steps`, or fewer when `passes` over the texts trained on need fewer."""
        if self.passes is None:
            return self.steps
        trained_on = max(1, num_texts - int(round(self.heldout_fraction * num_texts)))
        return max(1, min(self.steps, math.ceil(self.passes * trained_on / self.batch_size)))


@dataclass
class MLMSettings:
    """``method.mlm``."""

    name_or_path: Optional[str] = None  # null: the teacher's pre-trained checkpoint (teacher.name_or_path)
    adapt: MLMAdaptSettings = field(default_factory=MLMAdaptSettings)
    eval_batch_size: int = 64  # batch size when computing the distribution store

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "MLMSettings":
        options = dict(options or {})
        adapt = options.pop("adapt", None) or {}
        _check_keys("method.mlm", options, cls)
        _check_keys("method.mlm.adapt", adapt, MLMAdaptSettings)
        return cls(**options, adapt=MLMAdaptSettings(**adapt))


def _check_keys(prefix: str, options: dict[str, Any], settings: type) -> None:
    valid = [f.name for f in fields(settings)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        # A TypeError: kdexp.run reports it as a ConfigError naming the method.
        raise TypeError(f"unknown key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; valid: {', '.join(valid)}")


# Families whose questions share a passage (the column that holds it): the adaptation holds whole passages out.
PASSAGE_FAMILIES = (MULTIPLE_CHOICE, EXTRACTIVE_QA)
PASSAGE_COLUMN = "context"


@dataclass
class MLMTeacher:
    """The frozen MLM, and the key that identifies its weights (for the distribution store)."""

    model: Any
    key: str
    path: str
    info: dict[str, Any]


def _adaptation_texts(run: "RunContext", settings: MLMAdaptSettings) -> tuple[list[Any], str, list[str] | None]:
    """The task's training text (sentence pairs for pair tasks), its content fingerprint, and for tasks whose
    questions share passages (multiple choice, extractive QA) each text's passage: the held-out split's groups."""
    task = run.task
    if settings.max_texts is None:
        raw = run.data.raw[task.train_split]
    else:
        source = DataSource.from_data_config(run.cfg.data)
        raw = load_split(task, task.train_split, source, int(settings.max_texts))
    columns = [arrow_column(raw, name).to_pylist() for name in task.text_fields]
    texts = list(zip(*columns)) if len(columns) > 1 else columns[0]
    passages = arrow_column(raw, PASSAGE_COLUMN).to_pylist() if task.family in PASSAGE_FAMILIES else None
    return texts, content_fingerprint(raw, tuple(task.text_fields)), passages


def prepare_mlm_teacher(run: "RunContext", settings: MLMSettings) -> MLMTeacher:
    """Load the MLM teacher, or adapt one (once per key, stored under ``<cache_dir>/mlm``).

    Raises `MissingMLMHeadError` for a checkpoint without MLM head weights when the
    adaptation stage is disabled, and `VocabularyMismatchError` when the MLM's vocabulary
    is not the student's.
    """
    name = settings.name_or_path or run.cfg.teacher.name_or_path
    path = resolve_model_path(name, "method.mlm.name_or_path")
    try:
        model = load_mlm_teacher(path, expected_vocab=run.data.tokenizer)
        fingerprint = model_fingerprint(path)
        log.info("MLM teacher %s loaded with its own MLM head", path)
        return MLMTeacher(model, cache_key(kind="mlm", model=fingerprint), path, {"source": path, "adapted": False})
    except MissingMLMHeadError as err:
        if not settings.adapt.enabled:
            raise MissingMLMHeadError(
                f"{err} In kdexp: set method.mlm.adapt.enabled=true to run the MLM adaptation stage on "
                f"the task's training text, or method.mlm.name_or_path=<a checkpoint saved with its MLM head>."
            ) from None
    return _adapted_mlm_teacher(run, path, settings)


def adaptation_key(
    encoder_path: str,
    task_name: str,
    texts_fingerprint: str,
    tokenizer: Any,
    adapt: MLMAdaptSettings,
    max_length: int,
    precision: str = "32-true",
    heldout_by_passage: bool = False,
) -> str:
    """The key of one MLM adaptation: encoder weights, task, training texts, tokenizer, hyper-parameters, seed,
    the precision it trains in (left out at 32-true, so keys made before the option hold), and whether whole
    passages are held out (multiple choice and QA)."""
    return cache_key(
        kind="mlm_adaptation",
        encoder=model_fingerprint(encoder_path),
        task=task_name,
        texts=texts_fingerprint,
        tokenizer=tokenizer_fingerprint(tokenizer),
        hyperparameters=adapt.key_parts(max_length),
        **({} if precision == "32-true" else {"precision": precision}),
        **({"heldout": "by_passage"} if heldout_by_passage else {}),
    )


def adaptation_store(cache_dir: str | Path, task_name: str, key: str) -> Path:
    return Path(cache_dir) / "mlm" / f"{task_name}-{key}"


def run_adaptation(
    store: Path,
    key: str,
    task_name: str,
    encoder_path: str,
    texts: list[Any],
    texts_fingerprint: str,
    tokenizer: Any,
    adapt: MLMAdaptSettings,
    max_length: int,
    hardware: Hardware | None = None,
    checkpoints: CheckpointEvery | None = None,
    **extra: Any,
) -> None:
    """Run the adaptation stage and store its model, tokenizer and metrics atomically under ``store``.

    Its step checkpoint lives in ``<store>.partial`` (written when `checkpoints` says and at a stop
    signal): a run stopped there resumes from it, to the same adapted MLM; removed once stored.
    """
    log.info("MLM adaptation of %s on %d %s texts (key %s), in %s", encoder_path, len(texts), task_name, key, store)
    started = time.perf_counter()
    partial = store.with_name(store.name + ".partial")
    adaptation = adapt_mlm_head(
        encoder_path,
        texts,
        tokenizer,
        train_encoder=adapt.train_encoder,
        steps=adapt.budget_steps(len(texts)),
        batch_size=adapt.batch_size,
        learning_rate=adapt.learning_rate,
        encoder_learning_rate=adapt.encoder_learning_rate,
        max_length=max_length,
        mask_prob=adapt.mask_prob,
        heldout_fraction=adapt.heldout_fraction,
        seed=adapt.seed,
        hardware=hardware,
        checkpoints=AdaptationCheckpoints(partial / "adaptation.ckpt", key, checkpoints or CheckpointEvery()),
        **extra,
    )
    with atomic_directory(store) as tmp:
        adaptation.save(tmp)
        atomic_write_json(
            tmp / MLM_INFO_FILE,
            {
                "key": key,
                "task": task_name,
                "source_encoder": encoder_path,
                "texts": len(texts),
                "texts_fingerprint": texts_fingerprint,
                "hyperparameters": adapt.key_parts(max_length),
                "metrics": adaptation.metrics,
                "seconds": time.perf_counter() - started,
            },
        )
    shutil.rmtree(partial, ignore_errors=True)


def _adapted_mlm_teacher(run: "RunContext", encoder_path: str, settings: MLMSettings) -> MLMTeacher:
    adapt = settings.adapt
    task = run.task
    max_length = int(adapt.max_length or run.data.max_length)
    texts, texts_fingerprint, passages = _adaptation_texts(run, adapt)
    key = adaptation_key(
        encoder_path,
        task.name,
        texts_fingerprint,
        run.data.tokenizer,
        adapt,
        max_length,
        run.hardware.precision,
        heldout_by_passage=passages is not None,
    )
    store = adaptation_store(run.data.cache_dir, task.name, key)

    def load() -> dict[str, Any] | None:
        if not (store / MLM_INFO_FILE).exists():
            return None
        log.info("Reusing the adapted MLM %s", store)
        return json.loads((store / MLM_INFO_FILE).read_text())

    def adapt_and_store() -> dict[str, Any]:
        run_adaptation(
            store,
            key,
            task.name,
            encoder_path,
            texts,
            texts_fingerprint,
            run.data.tokenizer,
            adapt,
            max_length,
            run.hardware.single_device(),
            CheckpointEvery.from_config(run.cfg.get("checkpoint")),
            heldout_groups=passages,
        )
        return json.loads((store / MLM_INFO_FILE).read_text())

    info = load_or_compute(store, load, adapt_and_store)
    metrics = info["metrics"]
    log.info(
        "Adapted MLM %s: held-out masked-token accuracy %.4f (%.4f before adaptation) on %d tokens",
        store,
        metrics["masked_token_accuracy"],
        metrics["initial_masked_token_accuracy"],
        metrics["heldout_masked_tokens"],
    )
    model = load_mlm_teacher(store, expected_vocab=run.data.tokenizer)
    return MLMTeacher(model, key, str(store), dict(info, adapted=True))


# --------------------------------------------------------------------------- the distribution store


def topk_store_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "signals" / "mlm_topk" / f"{key}.pt"


def cached_topk_store(
    run: "RunContext", mlm: MLMTeacher, top_k: int, temperature: float, eval_batch_size: int
) -> TopKTokenStore:
    """The top-k ``q_t`` of the run's training split: loaded when stored, else computed and stored."""
    split = run.task.train_split
    tokenized = run.data.tokenized[split]
    data_key = run.data.keys[split]
    hardware = run.hardware
    batching = PassBatching(run.teacher.eval_tokens_per_batch, eval_batch_size)
    precision = {} if hardware.precision == "32-true" else {"precision": hardware.pass_precision}
    key = cache_key(
        kind="mlm_topk",
        mlm=mlm.key,
        data=data_key,
        temperature=float(temperature),
        top_k=int(top_k),
        **batching.key_parts(),
        **precision,
    )
    path = topk_store_path(run.data.cache_dir, key)
    lengths = row_lengths(tokenized).tolist()
    expected = {"key": key, "rows": len(lengths), "tokens": sum(lengths), "top_k": int(top_k)}

    def load() -> TopKTokenStore | None:
        cached = load_tensors(path, expected)
        if cached is None:
            return None
        log.info("Reusing the MLM top-%d distributions %s", top_k, path)
        return TopKTokenStore.from_tensors(cached, int(mlm.model.config.vocab_size))

    def compute() -> TopKTokenStore:
        started = time.perf_counter()
        model = hardware.to_device(mlm.model)
        loader = length_sorted_loader(tokenized, run.data.pad_token_id, batching, hardware=hardware)
        store = build_topk_store(model, loader, lengths, top_k, temperature, hardware)
        mlm.model.to("cpu")
        log.info(
            "MLM top-%d distributions of %d rows (%d tokens, %.1f MB) computed in %.1fs",
            top_k,
            len(lengths),
            sum(lengths),
            store.nbytes / 1e6,
            time.perf_counter() - started,
        )
        return store

    def save(store: TopKTokenStore) -> None:
        save_tensors(path, store.tensors(), dict(expected, vocab_size=store.vocab_size))
        log.info("MLM top-%d distributions stored in %s", top_k, path)

    return load_or_compute_together(path, load, compute, save, hardware)


def choose_distribution_source(
    distributions: str, top_k: int | None, num_tokens: int, cache_max_bytes: float
) -> tuple[str, str]:
    """``cached`` or ``live``, and why."""
    if distributions not in DISTRIBUTION_SOURCES:
        raise ValueError(
            f"method.distributions must be one of {', '.join(DISTRIBUTION_SOURCES)}; got '{distributions}'"
        )
    if top_k is None:
        if distributions == "cached":
            raise ValueError(
                "method.distributions=cached needs method.top_k: the exact dense form (top_k=null) would store "
                "|V| probabilities per token; use distributions=live or auto, or set top_k."
            )
        return "live", "exact dense form (top_k=null) is never stored"
    size = store_bytes(num_tokens, top_k)
    if distributions == "live":
        return "live", "method.distributions=live"
    if distributions == "auto" and size > cache_max_bytes:
        return "live", (
            f"{num_tokens} tokens x {top_k} x 6 bytes = {size / 1e6:.1f} MB > method.cache_max_bytes "
            f"({cache_max_bytes / 1e6:.1f} MB)"
        )
    return "cached", f"{num_tokens} tokens x {top_k} x 6 bytes = {size / 1e6:.1f} MB"
