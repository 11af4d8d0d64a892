"""`text_smoothing` (Wu et al. 2020, arXiv 2005.03848; docs/METHODS.md §2), and `text_smoothing_kd`.

The student reads, besides the original input, a *smoothed* input whose token at position
``t`` is the distribution ``p_t = lam·q_t + (1 - lam)·onehot(x_t)``, with
``q_t = softmax(MLM(x)_t / tau)`` from a frozen masked language model (MLM) sharing the
student's vocabulary; the student's word embeddings are ``p_t · W`` (``inputs_embeds``),
position and segment embeddings as usual. Special tokens and padding stay one-hot. At
inference the student reads ordinary one-hot input. The maths is in ``kdexp.smoothing``.

Choices (each a key of ``conf/method/text_smoothing.yaml``):

- ``schedule``: ``two_steps`` (default; the authors' follow-up code): per batch, one
  optimiser step on the loss of the smoothed input, then one on the loss of the original
  input. Manual optimisation: the run's AdamW and linear schedule (the scheduler steps
  once per batch, after both steps, so warm-up and decay span the run as for the other
  methods; ``trainer.global_step`` counts 2 per batch); the trainer's gradient clipping is
  applied by hand to each step (Lightning refuses ``gradient_clip_val`` with manual
  optimisation, so the module takes the value over from the trainer, see
  `configure_callbacks`). ``sum``: one step on ``(L_smoothed + L_original) / 2`` with
  automatic optimisation; halved so that the loss has one fine-tuning loss's scale (same
  clipping threshold) and equals it exactly at ``smooth_rate = 0``.
- Per input, ``L = CE`` (MSE for STS-B: smoothing applies to regression unchanged);
  with ``kd_alpha > 0`` (``text_smoothing_kd``), ``L = (1 - a)·CE + a·T²·KL`` from the
  fine-tuned classification teacher's cached logits on the *original* input, for both
  inputs (the paper's "smoothed texts + smoothed labels"); MSE to the teacher's
  prediction for STS-B, as in `vanilla_kd`.
- ``top_k``: truncate ``q_t`` to its ``k`` most probable tokens, renormalised (sparse
  ``embedding_bag`` form); ``null`` is the exact dense ``|V|``-wide form.
- ``distributions``: where ``q_t`` comes from. ``cached``: the top-k ``q_t`` of the whole
  training split, computed once per (MLM key, tokenised split key, ``tau``, ``k``) and
  stored with `kdexp.cache.save_tensors` (float16 probabilities + int32 ids, ragged by
  example: 6·k bytes per real token; see `kdexp.smoothing.store`). ``live``: an MLM forward
  in every training step. ``auto`` (default): cached unless the store would exceed
  ``cache_max_bytes`` (2 GB). Numbers with MiniLM's tokenizer, max length 128: top-64 is
  384 bytes per token, i.e. 5.1 kB per SST-2 row (13.3 tokens; 344 MB for all 67k rows),
  20 kB per MRPC row, 26 kB per RTE row (64 MB for RTE); the full MNLI or QQP training sets
  (~4-6 GB) go live unless ``k`` or the threshold changes. The dense form (``top_k=null``)
  would take 61 kB per token even in float16 (0.81 MB per SST-2 row, 55 GB for SST-2;
  4.1 MB per RTE row): it is always computed live.
- The MLM (``mlm.name_or_path``, default the teacher's *pre-trained* checkpoint, i.e.
  ``teacher.name_or_path``): loaded with its MLM head by `load_mlm_teacher`, which refuses
  a foreign vocabulary. A checkpoint without MLM head weights is refused
  (`MissingMLMHeadError`) unless ``mlm.adapt.enabled``: then the MLM adaptation stage
  (`adapt_mlm_head`, optionally training the encoder too) runs once per key (encoder
  fingerprint, task, training texts, adaptation hyper-parameters, seed) and is stored under
  ``<cache_dir>/mlm/<task>-<key>`` with its held-out masked-token accuracy, for every
  later run to reuse.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from omegaconf import MISSING, OmegaConf

from kdexp.cache import atomic_directory, atomic_write_json, cache_key, load_or_compute, load_tensors, save_tensors
from kdexp.config import require
from kdexp.data import DataSource, content_fingerprint, load_split, make_loader, tokenizer_fingerprint
from kdexp.losses import vanilla_kd_loss
from kdexp.methods.base import DistillationModule
from kdexp.models import model_fingerprint, resolve_model_path
from kdexp.smoothing import (
    MissingMLMHeadError,
    adapt_mlm_head,
    load_mlm_teacher,
    mlm_token_distributions,
    smooth_token_distributions,
    smoothed_inputs_embeds,
    special_or_padding_mask,
)
from kdexp.smoothing.smoothing import TokenDistributions
from kdexp.smoothing.store import TopKTokenStore, build_topk_store, store_bytes, topk_distributions_at

if TYPE_CHECKING:
    from kdexp.run import RunContext

log = logging.getLogger(__name__)

SCHEDULES = ("two_steps", "sum")
DISTRIBUTION_SOURCES = ("auto", "cached", "live")
MLM_INFO_FILE = "mlm.json"
RUN_MLM_FILE = "mlm_teacher.json"


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

    def key_parts(self, max_length: int) -> dict[str, Any]:
        parts = {k: v for k, v in asdict(self).items() if k not in ("enabled", "max_texts")}
        parts["max_length"] = max_length
        return parts


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


@dataclass
class MLMTeacher:
    """The frozen MLM, and the key that identifies its weights (for the distribution store)."""

    model: Any
    key: str
    path: str
    info: dict[str, Any]


def _adaptation_texts(run: "RunContext", settings: MLMAdaptSettings) -> tuple[list[Any], str]:
    """The task's training text (sentence pairs for pair tasks) and its content fingerprint."""
    task = run.task
    if settings.max_texts is None:
        raw = run.data.raw[task.train_split]
    else:
        source = DataSource.from_config(run.cfg.data.source, run.cfg.data.glue_dir)
        raw = load_split(task, task.train_split, source, int(settings.max_texts))
    columns = [list(raw[name]) for name in task.text_fields]
    texts = list(zip(*columns)) if len(columns) > 1 else columns[0]
    return texts, content_fingerprint(raw, tuple(task.text_fields))


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
    encoder_path: str, task_name: str, texts_fingerprint: str, tokenizer: Any, adapt: MLMAdaptSettings, max_length: int
) -> str:
    """The key of one MLM adaptation: encoder weights, task, training texts, tokenizer, hyper-parameters, seed."""
    return cache_key(
        kind="mlm_adaptation",
        encoder=model_fingerprint(encoder_path),
        task=task_name,
        texts=texts_fingerprint,
        tokenizer=tokenizer_fingerprint(tokenizer),
        hyperparameters=adapt.key_parts(max_length),
    )


def adaptation_store(cache_dir: str | Path, task_name: str, key: str) -> Path:
    return Path(cache_dir) / "mlm" / f"{task_name}-{key}"


def run_adaptation(
    store: Path, key: str, task_name: str, encoder_path: str, texts: list[Any], texts_fingerprint: str,
    tokenizer: Any, adapt: MLMAdaptSettings, max_length: int, device: Any = "cpu", **extra: Any,
) -> None:
    """Run the adaptation stage and store its model, tokenizer and metrics atomically under ``store``."""
    log.info("MLM adaptation of %s on %d %s texts (key %s), in %s", encoder_path, len(texts), task_name, key, store)
    started = time.perf_counter()
    adaptation = adapt_mlm_head(
        encoder_path,
        texts,
        tokenizer,
        train_encoder=adapt.train_encoder,
        steps=adapt.steps,
        batch_size=adapt.batch_size,
        learning_rate=adapt.learning_rate,
        encoder_learning_rate=adapt.encoder_learning_rate,
        max_length=max_length,
        mask_prob=adapt.mask_prob,
        heldout_fraction=adapt.heldout_fraction,
        seed=adapt.seed,
        device=device,
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


def _adapted_mlm_teacher(run: "RunContext", encoder_path: str, settings: MLMSettings) -> MLMTeacher:
    adapt = settings.adapt
    task = run.task
    max_length = int(adapt.max_length or run.data.max_length)
    texts, texts_fingerprint = _adaptation_texts(run, adapt)
    key = adaptation_key(encoder_path, task.name, texts_fingerprint, run.data.tokenizer, adapt, max_length)
    store = adaptation_store(run.data.cache_dir, task.name, key)

    def load() -> dict[str, Any] | None:
        if not (store / MLM_INFO_FILE).exists():
            return None
        log.info("Reusing the adapted MLM %s", store)
        return json.loads((store / MLM_INFO_FILE).read_text())

    def adapt_and_store() -> dict[str, Any]:
        run_adaptation(
            store, key, task.name, encoder_path, texts, texts_fingerprint, run.data.tokenizer, adapt, max_length,
            run.teacher.device,
        )
        return json.loads((store / MLM_INFO_FILE).read_text())

    info = load_or_compute(store, load, adapt_and_store)
    metrics = info["metrics"]
    log.info(
        "Adapted MLM %s: held-out masked-token accuracy %.4f (%.4f before adaptation) on %d tokens",
        store, metrics["masked_token_accuracy"], metrics["initial_masked_token_accuracy"],
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
    key = cache_key(kind="mlm_topk", mlm=mlm.key, data=data_key, temperature=float(temperature), top_k=int(top_k))
    path = topk_store_path(run.data.cache_dir, key)
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    expected = {"key": key, "rows": len(lengths), "tokens": sum(lengths), "top_k": int(top_k)}

    def load() -> TopKTokenStore | None:
        cached = load_tensors(path, expected)
        if cached is None:
            return None
        log.info("Reusing the MLM top-%d distributions %s", top_k, path)
        return TopKTokenStore.from_tensors(cached, int(mlm.model.config.vocab_size))

    def compute() -> TopKTokenStore:
        started = time.perf_counter()
        device = run.teacher.device
        model = mlm.model.to(device)
        loader = make_loader(tokenized, run.data, eval_batch_size, shuffle=False)
        store = build_topk_store(model, loader, lengths, top_k, temperature, device)
        mlm.model.to("cpu")
        save_tensors(path, store.tensors(), dict(expected, vocab_size=store.vocab_size))
        log.info(
            "MLM top-%d distributions of %d rows (%d tokens, %.1f MB) computed in %.1fs and stored in %s",
            top_k, len(lengths), sum(lengths), store.nbytes / 1e6, time.perf_counter() - started, path,
        )
        return store

    return load_or_compute(path, load, compute)


def choose_distribution_source(
    distributions: str, top_k: int | None, num_tokens: int, cache_max_bytes: float
) -> tuple[str, str]:
    """``cached`` or ``live``, and why."""
    if distributions not in DISTRIBUTION_SOURCES:
        raise ValueError(f"method.distributions must be one of {', '.join(DISTRIBUTION_SOURCES)}; got '{distributions}'")
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


# --------------------------------------------------------------------------- the method


@dataclass
class TextSmoothingOptions:
    smooth_rate: float = MISSING
    temperature: float = MISSING
    top_k: Optional[int] = MISSING
    schedule: str = MISSING
    kd_alpha: float = MISSING
    kd_temperature: float = MISSING
    distributions: str = MISSING
    cache_max_bytes: float = MISSING
    mlm: MLMSettings = field(default_factory=MLMSettings)

    def check(self) -> None:
        require(0 <= self.smooth_rate <= 1, "method.smooth_rate", self.smooth_rate, "lambda in [0, 1]")
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive tau")
        require(self.top_k is None or self.top_k >= 1, "method.top_k", self.top_k, "null (exact) or a positive k")
        require(self.schedule in SCHEDULES, "method.schedule", self.schedule, " or ".join(SCHEDULES))
        require(0 <= self.kd_alpha <= 1, "method.kd_alpha", self.kd_alpha, "a weight in [0, 1]")
        require(self.kd_temperature > 0, "method.kd_temperature", self.kd_temperature, "a positive temperature")
        require(self.distributions in DISTRIBUTION_SOURCES, "method.distributions", self.distributions,
                ", ".join(DISTRIBUTION_SOURCES))
        adapt = self.mlm.adapt
        require(adapt.steps >= 1, "method.mlm.adapt.steps", adapt.steps, "1 or more")
        require(0 < adapt.mask_prob < 1, "method.mlm.adapt.mask_prob", adapt.mask_prob, "a probability in (0, 1)")
        require(0 < adapt.heldout_fraction < 1, "method.mlm.adapt.heldout_fraction", adapt.heldout_fraction,
                "a fraction in (0, 1)")


class TextSmoothing(DistillationModule):
    """Text smoothing; ``kd_alpha > 0`` adds soft-label KD from the fine-tuned teacher (`text_smoothing_kd`)."""

    Options = TextSmoothingOptions

    def __init__(
        self,
        *args: Any,
        special_token_ids: list[int],
        mlm_model: torch.nn.Module | None = None,
        topk_store: TopKTokenStore | None = None,
        smooth_rate: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        schedule: str = "two_steps",
        kd_alpha: float = 0.0,
        kd_temperature: float = 2.0,
        teacher_logits: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if (mlm_model is None) == (topk_store is None):
            raise ValueError("TextSmoothing needs exactly one of mlm_model (live) or topk_store (cached).")
        if schedule not in SCHEDULES:
            raise ValueError(f"method.schedule must be one of {', '.join(SCHEDULES)}; got '{schedule}'")
        if not 0.0 <= smooth_rate <= 1.0:
            raise ValueError(f"method.smooth_rate (lambda) must be in [0, 1]; got {smooth_rate}")
        if temperature <= 0:
            raise ValueError(f"method.temperature (tau) must be positive; got {temperature}")
        if not 0.0 <= kd_alpha <= 1.0:
            raise ValueError(f"method.kd_alpha must be in [0, 1]; got {kd_alpha}")
        if kd_alpha > 0 and teacher_logits is None:
            raise ValueError("method.kd_alpha > 0 needs the teacher's logits")
        if topk_store is not None and top_k is not None and topk_store.top_k != top_k:
            raise ValueError(f"the distribution store holds top-{topk_store.top_k}, not top-{top_k}")
        self.special_token_ids = sorted(set(int(i) for i in special_token_ids))
        self.smooth_rate = float(smooth_rate)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.schedule = schedule
        self.kd_alpha = float(kd_alpha)
        self.kd_temperature = float(kd_temperature)
        self.topk_store = topk_store
        # Not a submodule and not in checkpoints: the MLM is frozen and stored elsewhere.
        self._mlm = [mlm_model.eval().requires_grad_(False)] if mlm_model is not None else []
        if teacher_logits is not None:
            self.register_buffer("teacher_logits", teacher_logits.float(), persistent=False)
        self.automatic_optimization = schedule == "sum"
        self._manual_clip: tuple[float, str] | None = None

    @classmethod
    def from_run(
        cls,
        run: "RunContext",
        smooth_rate: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        schedule: str = "two_steps",
        kd_alpha: float = 0.0,
        kd_temperature: float = 2.0,
        distributions: str = "auto",
        cache_max_bytes: float = 2e9,
        mlm: dict[str, Any] | None = None,
    ) -> "TextSmoothing":
        if schedule not in SCHEDULES:
            raise ValueError(f"method.schedule must be one of {', '.join(SCHEDULES)}; got '{schedule}'")
        settings = MLMSettings.from_options(OmegaConf.to_container(mlm) if OmegaConf.is_config(mlm) else mlm)
        split = run.task.train_split
        num_tokens = sum(len(ids) for ids in run.data.tokenized[split]["input_ids"])
        source, why = choose_distribution_source(distributions, top_k, num_tokens, cache_max_bytes)
        mlm_teacher = prepare_mlm_teacher(run, settings)
        log.info("MLM distributions: %s (%s)", source, why)
        _write_run_record(run, mlm_teacher, source, why, top_k, num_tokens)
        signals: dict[str, Any] = {}
        if source == "cached":
            assert top_k is not None
            signals["topk_store"] = cached_topk_store(run, mlm_teacher, top_k, temperature, settings.eval_batch_size)
        else:
            signals["mlm_model"] = mlm_teacher.model
        if kd_alpha > 0:
            signals["teacher_logits"] = run.teacher.logits(run.data, split)
        return cls(
            student=run.student,
            task=run.task,
            optim=run.optim,
            special_token_ids=list(run.data.tokenizer.all_special_ids),
            smooth_rate=smooth_rate,
            temperature=temperature,
            top_k=top_k,
            schedule=schedule,
            kd_alpha=kd_alpha,
            kd_temperature=kd_temperature,
            **signals,
        )

    # ------------------------------------------------------------------ smoothing

    def on_fit_start(self) -> None:
        for mlm in self._mlm:
            mlm.to(self.device)

    @torch.no_grad()
    def mlm_distributions(self, batch: dict[str, torch.Tensor]) -> TokenDistributions:
        """``q_t`` for the batch: from the store, or from a live MLM forward."""
        if self.topk_store is not None:
            q = self.topk_store.distributions(batch["idx"], batch["attention_mask"])
            return TokenDistributions(q.probs.to(self.device), q.token_ids.to(self.device), q.vocab_size)
        mlm = self._mlm[0]
        inputs = self.model_inputs(batch)
        if self.top_k is None:
            return mlm_token_distributions(mlm(**inputs).logits, self.temperature)
        real = batch["attention_mask"].bool()
        q = topk_distributions_at(
            mlm, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), real, self.top_k,
            self.temperature,
        )
        probs = q.probs.new_zeros(*real.shape, self.top_k)
        token_ids = q.token_ids.new_zeros(*real.shape, self.top_k)
        probs[real], token_ids[real] = q.probs[0], q.token_ids[0]
        return TokenDistributions(probs, token_ids, q.vocab_size)

    def smoothed_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``p_t · W`` for the batch, ``[B, L, H]``; gradients reach the word embeddings ``W``."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        keep = special_or_padding_mask(input_ids, attention_mask, self.special_token_ids)
        smoothed = smooth_token_distributions(self.mlm_distributions(batch), input_ids, keep, self.smooth_rate)
        return smoothed_inputs_embeds(smoothed, self.student.get_input_embeddings().weight)

    def forward_smoothed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in self.model_inputs(batch).items() if k != "input_ids"}
        return self.student(inputs_embeds=self.smoothed_embeddings(batch), **inputs).logits

    # ------------------------------------------------------------------ losses

    def input_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE (MSE for STS-B), or with ``kd_alpha > 0`` CE and soft-label KD, for one of the two inputs."""
        if self.kd_alpha == 0:
            loss = self.task_loss(logits, batch["labels"])
            return loss, {f"ce_{name}": loss.detach()}
        loss, parts = vanilla_kd_loss(
            logits, self.teacher_logits[batch["idx"]], batch["labels"], alpha=self.kd_alpha,
            temperature=self.kd_temperature, regression=self.task.is_regression,
        )
        return loss, {f"{part}_{name}": value for part, value in parts.items()}

    def smoothed_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.input_loss(self.forward_smoothed(batch), batch, "smoothed")

    def original_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.input_loss(self(batch), batch, "original")

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ``sum`` schedule's loss: ``(L_smoothed + L_original) / 2``."""
        smoothed, smoothed_parts = self.smoothed_loss(batch)
        original, original_parts = self.original_loss(batch)
        return 0.5 * (smoothed + original), {**smoothed_parts, **original_parts}

    # ------------------------------------------------------------------ the two-step schedule

    def configure_callbacks(self) -> list:
        """With manual optimisation, take the trainer's gradient clipping over (Lightning refuses it there).

        Called by Lightning before it checks the trainer's configuration; the clipping is
        then applied by hand to each of the two steps (`_manual_step`), exactly as the
        trainer would have applied it to one.
        """
        trainer = self._trainer
        if not self.automatic_optimization and trainer is not None and trainer.gradient_clip_val:
            self._manual_clip = (float(trainer.gradient_clip_val), trainer.gradient_clip_algorithm or "norm")
            trainer.gradient_clip_val = None
        return []

    def _manual_step(self, optimizer: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self._manual_clip is not None:
            value, algorithm = self._manual_clip
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
        optimizer.step()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        smoothed, smoothed_parts = self.smoothed_loss(batch)
        self._manual_step(optimizer, smoothed)
        original, original_parts = self.original_loss(batch)
        self._manual_step(optimizer, original)
        if scheduler is not None:
            scheduler.step()
        loss = 0.5 * (smoothed.detach() + original.detach())
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in {**smoothed_parts, **original_parts}.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss


def _write_run_record(run: "RunContext", mlm: MLMTeacher, source: str, why: str, top_k: int | None, tokens: int) -> None:
    """``mlm_teacher.json`` in the run folder: which MLM, its adaptation metrics, where ``q_t`` came from."""
    record = {
        "mlm_key": mlm.key,
        "mlm_path": mlm.path,
        "adapted": mlm.info.get("adapted", False),
        "adaptation_metrics": mlm.info.get("metrics"),
        "distributions": source,
        "distributions_reason": why,
        "top_k": top_k,
        "train_tokens": tokens,
    }
    run.method_info.update(record)
    run_dir = Path(run.run_dir)
    if run_dir.resolve() == Path.cwd().resolve():
        return  # kdexp.benchmark builds its contexts with run_dir="." (no run folder): write nothing there
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_MLM_FILE, record)
