"""Decision-based KD (DBKD; Zhou et al., ACL 2023, arXiv 2306.08909; docs/methods/dbkd.md) and the
decision-only baselines of the paper.

The teacher is a black box that answers with its top-1 decision. Every method here sees it
only through :class:`kdexp.decision.DecisionTeacher` (``decide(texts) -> LongTensor``), via the
shared, cached query stage (:func:`kdexp.decision.queries.query_decisions`): ``N`` queries per
training example (the original and ``N - 1`` EDA copies), giving decisions ``[n, N]`` and counts
``c`` ``[n, C]``. No method calls ``Teacher.logits`` or holds the teacher's model.

All five methods minimise the same loss and differ only in the target distribution ``q_i``:

    L = ce_weight·CE(z_S, y) + alpha·T²·KL(q_i || softmax(z_S / T))

- ``dbkd``: ``q = softmax(s'·ẑ / T)`` with ``ẑ`` the estimated teacher logits
  (:func:`kdexp.decision.estimate_logits_from_counts`: solve ``P(ẑ) = p̂`` under Gaussian noise of
  std ``noise_std`` = ``s``; rows with a zero count by ``zero_count_rule`` (Jeffreys ``pseudo_count`` by default); each distinct
  sorted count vector solved once). With ``ce_weight = 1`` this is the paper's
  ``L = CE + a·T²·KL(softmax(s'ẑ/T) || softmax(z_S/T))``; defaults ``a = 0.7, T = 1, s' = 1, s = 1``.
- ``decision_hard``: ``q = onehot(d_0)``, the teacher's top-1 label on the original input. With
  ``T = 1`` the KD term is the CE with the teacher's label, so the loss is
  ``CE(y) + a·CE(teacher label)``.
- ``decision_hard_aug``: as ``decision_hard``, plus the ``N - 1`` augmented copies as extra
  training examples, each with ``q = onehot(teacher's decision on that copy)``. A copy has no gold
  label (the augmentation may change it), so it contributes only the KD term; the CE term is summed
  over the originals of a batch and divided by the batch size (the copies count as examples of the
  batch). ``copies_per_example`` can limit the extra examples to the first ``k`` copies of each row.
- ``decision_noise_smooth``: ``q = p̂ = c / N`` (unsmoothed: a zero count gives a zero target).
- ``decision_surrogate``: ``q = softmax(z_sur / T)``, the logits of a student-sized surrogate trained
  with CE on the teacher's top-1 decisions (the student's own initialisation; cached by key).
- ``decision_label_smooth``: ``q`` puts ``1 - eps`` on the top-1 label of the original input and
  spreads ``eps`` evenly over the *other* ``C - 1`` classes (``C = 2``, ``eps = 0.1``: 0.9 / 0.1).
  ``smoothing_form=uniform`` is the authors' form: ``(1 - eps)·onehot + eps / C`` (0.95 / 0.05),
  sharpened by ``1 / T`` (``q^(1/T)`` renormalised; no change at ``T = 1``).

Reading of the paper's baselines: they are "decision-only" variants of the same distillation
objective, so they keep the gold-label CE and the weight ``a`` of the KD term, and only the
target changes; all default to DBKD's recommended ``a = 0.7, T = 1``. ``ce_weight = 0`` gives the
"teacher labels only" reading. For targets that are probabilities (``hard``, ``noise_smooth``,
``label_smooth``) the temperature applies to the student only (``T² · KL(q || softmax(z_S/T))``);
at the default ``T = 1`` it has no effect.

Refused before training: regression tasks (STS-B has no decisions to count), and
``student.from_finetuned_teacher=true`` (that student would copy the fine-tuned teacher's
weights, white-box knowledge a decision-based teacher does not reveal).

Each run writes ``decision_stats.json`` in its folder (and the same under ``method_info`` in
``results.json``) and logs once: the query stage (cached or
not, its time, queries per example), agreement (fraction of examples whose ``N`` decisions all
agree, distinct count vectors), the teacher's accuracy on the training originals, and for
``dbkd`` the estimator's time and the estimated logits' spread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING

from kdexp.cache import cache_key, load_or_compute, load_tensors, save_tensors
from kdexp.config import require
from kdexp.data import arrow_column, tokenize_split
from kdexp.decision.eda import EDA_STYLES
from kdexp.decision.estimator import ZERO_COUNT_RULES, estimate_logits_from_counts
from kdexp.decision.queries import DecisionQueries, QueryConfig, copies_as_raw, decision_statistics, query_decisions
from kdexp.decision.surrogate import SurrogateSettings, logits_of, state_fingerprint, train_surrogate
from kdexp.decision.teacher import DecisionTeacher
from kdexp.errors import ConfigError
from kdexp.losses import soft_target_kd
from kdexp.losses.precision import full_precision
from kdexp.methods.base import DistillationModule
from kdexp.tasks import CLASSIFICATION, MULTIPLE_CHOICE
from kdexp.teacher import batch_rows

if TYPE_CHECKING:
    from kdexp.context import RunContext
    from kdexp.tasks import GlueTask

log = logging.getLogger(__name__)

STATS_FILE = "decision_stats.json"


@dataclass
class EDAOptions:
    synonym_replacement: bool = MISSING
    random_insertion: bool = MISSING
    random_swap: bool = MISSING
    random_deletion: bool = MISSING
    rate_scale: float = MISSING
    max_rate: float = MISSING
    style: str = "kdexp"
    rows_per_draw: int = 1000


@dataclass
class QueriesOptions:
    """`method.queries`: the query stage shared by every decision method."""

    num_queries: int = MISSING
    seed: int = MISSING
    batch_size: Optional[int] = MISSING
    eda: EDAOptions = field(default_factory=EDAOptions)

    def check(self) -> None:
        require(self.num_queries >= 1, "method.queries.num_queries", self.num_queries, "1 or more (the original input)")
        require(
            self.batch_size is None or self.batch_size >= 1,
            "method.queries.batch_size",
            self.batch_size,
            "null or a positive batch size",
        )
        eda = self.eda
        require(
            any((eda.synonym_replacement, eda.random_insertion, eda.random_swap, eda.random_deletion)),
            "method.queries.eda",
            "all operations off",
            "at least one EDA operation on",
        )
        require(eda.rate_scale >= 0, "method.queries.eda.rate_scale", eda.rate_scale, "0 or more")
        require(0 <= eda.max_rate <= 1, "method.queries.eda.max_rate", eda.max_rate, "a rate in [0, 1]")
        require(eda.style in EDA_STYLES, "method.queries.eda.style", eda.style, " or ".join(EDA_STYLES))
        require(eda.rows_per_draw >= 1, "method.queries.eda.rows_per_draw", eda.rows_per_draw, "1 or more rows")


@dataclass
class DecisionOptions:
    alpha: float = MISSING
    temperature: float = MISSING
    ce_weight: float = MISSING
    queries: QueriesOptions = field(default_factory=QueriesOptions)

    def check(self) -> None:
        require(self.alpha >= 0, "method.alpha", self.alpha, "a non-negative weight")
        require(self.temperature > 0, "method.temperature", self.temperature, "a positive temperature")
        require(self.ce_weight >= 0, "method.ce_weight", self.ce_weight, "a non-negative weight")
        self.queries.check()


@dataclass
class DBKDOptions(DecisionOptions):
    logit_scale: float = MISSING
    noise_std: float = MISSING
    pseudo_count: float = MISSING
    zero_count_rule: str = MISSING

    def check(self) -> None:
        super().check()
        require(
            self.zero_count_rule in ZERO_COUNT_RULES,
            "method.zero_count_rule",
            self.zero_count_rule,
            ", ".join(ZERO_COUNT_RULES),
        )
        require(self.noise_std > 0, "method.noise_std", self.noise_std, "a positive standard deviation")
        require(self.pseudo_count > 0, "method.pseudo_count", self.pseudo_count, "a positive pseudo-count (e.g. 0.5)")


LABEL_SMOOTHING_FORMS = ("others", "uniform")


@dataclass
class LabelSmoothOptions(DecisionOptions):
    smoothing: float = MISSING
    smoothing_form: str = "others"

    def check(self) -> None:
        super().check()
        require(0 <= self.smoothing < 1, "method.smoothing", self.smoothing, "a value in [0, 1)")
        require(
            self.smoothing_form in LABEL_SMOOTHING_FORMS,
            "method.smoothing_form",
            self.smoothing_form,
            ", ".join(LABEL_SMOOTHING_FORMS),
        )


@dataclass
class SurrogateOptions(DecisionOptions):
    surrogate_epochs: int = MISSING
    surrogate_learning_rate: Optional[float] = MISSING

    def check(self) -> None:
        super().check()
        require(self.surrogate_epochs >= 1, "method.surrogate_epochs", self.surrogate_epochs, "1 or more")
        lr = self.surrogate_learning_rate
        require(lr is None or lr > 0, "method.surrogate_learning_rate", lr, "null (optim.learning_rate) or positive")


@dataclass
class HardAugOptions(DecisionOptions):
    copies_per_example: Optional[int] = MISSING

    def check(self) -> None:
        super().check()
        require(
            self.copies_per_example is None or self.copies_per_example >= 0,
            "method.copies_per_example",
            self.copies_per_example,
            "null (all N-1 copies) or 0 or more",
        )


def hard_targets(decisions: torch.Tensor, num_labels: int) -> torch.Tensor:
    """One-hot rows of the top-1 labels ``[n]`` -> ``[n, C]`` float."""
    return F.one_hot(decisions.long(), num_labels).float()


def label_smoothed_targets(decisions: torch.Tensor, num_labels: int, smoothing: float) -> torch.Tensor:
    """``1 - eps`` on the label, ``eps / (C - 1)`` on each other class."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"label smoothing must lie in [0, 1), got {smoothing}")
    if num_labels < 2:
        return hard_targets(decisions, num_labels)
    onehot = hard_targets(decisions, num_labels)
    return onehot * (1.0 - smoothing) + (1.0 - onehot) * (smoothing / (num_labels - 1))


def uniform_smoothed_targets(
    decisions: torch.Tensor, num_labels: int, smoothing: float, temperature: float = 1.0
) -> torch.Tensor:
    """The DBKD authors' form: ``(1 - eps)·onehot + eps / C``, sharpened by ``1 / T`` (``q^(1/T)``, renormalised)."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"label smoothing must lie in [0, 1), got {smoothing}")
    smoothed = hard_targets(decisions, num_labels) * (1.0 - smoothing) + smoothing / num_labels
    return torch.softmax(smoothed.log() / temperature, dim=-1)


def noise_smoothed_targets(counts: torch.Tensor) -> torch.Tensor:
    """``p̂ = c / N`` per row."""
    counts = counts.double()
    return (counts / counts.sum(dim=1, keepdim=True)).float()


class DecisionDistillation(DistillationModule):
    """``L = ce_weight·CE(y) + alpha·T²·KL(q_i || softmax(z_S/T))``; subclasses define ``q``.

    Args:
        targets: ``[rows, C]`` probability targets indexed by ``batch["idx"]`` (or None when the
            subclass computes them, as ``dbkd`` does from the estimated logits).
        num_original: rows ``< num_original`` are original training examples (gold CE applies);
            rows at or above it are extra examples without a gold term (``decision_hard_aug``).
    """

    families = (CLASSIFICATION, MULTIPLE_CHOICE)

    method_name: ClassVar[str] = "decision"
    Options = DecisionOptions

    def __init__(
        self,
        *args: Any,
        options: DecisionOptions,
        targets: torch.Tensor | None = None,
        num_original: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.options = options
        self.num_original = num_original
        # On the CPU, not a buffer: a batch's rows travel with the batch (`batch_rows`).
        self.targets = None if targets is None else targets.float()

    # ------------------------------------------------------------------ refusals

    @classmethod
    def check_task(cls, task: "GlueTask") -> None:
        super().check_task(task)
        if task.is_regression:
            raise ConfigError(
                f"method '{cls.method_name}' is not defined for the regression task {task.name}: decision-based "
                f"distillation counts the teacher's top-1 class decisions, and {task.name} has no classes. "
                "Use finetune or vanilla_kd for it."
            )

    @classmethod
    def check_config(cls, cfg: Any, task: "GlueTask") -> None:
        super().check_config(cfg, task)
        if cfg.student.get("from_finetuned_teacher", False):
            raise ConfigError(
                f"method '{cls.method_name}' treats the teacher as a black box that only returns labels, but "
                "student.from_finetuned_teacher=true would build the student from the fine-tuned teacher's "
                "weights (white-box knowledge). Use student.from_finetuned_teacher=false (the pre-trained "
                "checkpoint's layers)."
            )

    # ------------------------------------------------------------------ building

    @classmethod
    def from_run(cls, run: "RunContext", options: DecisionOptions) -> "DecisionDistillation":
        cls.check_config(run.cfg, run.task)
        config = QueryConfig.from_options(asdict(options.queries))
        teacher = DecisionTeacher.from_teacher(run.teacher, run.data.max_length, config.batch_size)
        decided = query_decisions(teacher, run.data.raw[run.task.train_split], run.task, config, run.data.cache_dir)
        gold = torch.as_tensor(arrow_column(run.data.raw[run.task.train_split], "label").to_numpy().copy())
        stats = {"method": cls.method_name, **decision_statistics(decided, gold)}
        module = cls.from_decisions(run, decided, stats, options)
        cls._report(run, stats)
        return module

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: Any
    ) -> "DecisionDistillation":
        """Build the module from the decisions (subclasses turn them into targets)."""
        raise NotImplementedError

    @staticmethod
    def _report(run: "RunContext", stats: dict[str, Any]) -> None:
        log.info(
            "Decision queries (%s): %d examples x %d queries; all %d agree on %.1f%% of the examples; %d distinct "
            "count vectors (%d sorted); teacher accuracy on the training originals %.3f; query stage %.1fs "
            "(%.1f ms per example)%s",
            "cached" if stats["from_cache"] else "computed now",
            stats["examples"],
            stats["num_queries"],
            stats["num_queries"],
            100 * stats["all_agree_fraction"],
            stats["distinct_count_vectors"],
            stats["distinct_sorted_count_vectors"],
            stats.get("teacher_train_accuracy", float("nan")),
            stats["augment_seconds"] + stats["query_seconds"],
            stats["query_ms_per_example"],
            "" if not stats["from_cache"] else " when it ran",
        )
        if "estimator_seconds" in stats:
            log.info(
                "Estimated logits: %d distinct sorted count vectors solved in %.3fs; |z_hat| max %.3f; "
                "all-agree rows: z_hat margin %s",
                stats["estimator_solved_vectors"],
                stats["estimator_seconds"],
                stats["estimated_logit_abs_max"],
                stats.get("all_agree_margin"),
            )
        run.method_info.update(stats)
        run.write_run_file(STATS_FILE, stats)

    # ------------------------------------------------------------------ loss

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = super().batch_rows(batch)
        if self.targets is not None:
            rows["decision_targets"] = self.targets[batch["idx"].cpu()]
        return rows

    def targets_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.targets is not None
        return batch_rows(batch, "decision_targets", self.targets)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch)
        kd = soft_target_kd(logits, self.targets_for(batch), self.options.temperature)
        if self.num_original is None:
            ce = self.task_loss(logits, batch["labels"])
        else:
            is_original = (batch["idx"] < self.num_original).float()
            per_example = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
            ce = (per_example * is_original).sum() / logits.shape[0]
        return {"ce": ce, "kd": kd}

    def loss_weights(self) -> dict[str, float | torch.Tensor]:
        return {"ce": self.options.ce_weight, "kd": self.options.alpha}


class DBKD(DecisionDistillation):
    """``dbkd``: soft targets ``softmax(s'·ẑ/T)`` from logits estimated from the decision counts."""

    method_name = "dbkd"
    Options = DBKDOptions
    options: DBKDOptions

    def __init__(self, *args: Any, estimated_logits: torch.Tensor, **kwargs: Any):
        super().__init__(*args, targets=None, **kwargs)
        self.estimated_logits = estimated_logits.float()  # on the CPU, like `targets`

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: DBKDOptions
    ) -> "DBKD":
        counts = decided.counts
        start = time.perf_counter()
        estimated = estimate_logits_from_counts(
            counts,
            noise_std=options.noise_std,
            pseudo_count=options.pseudo_count,
            zero_count_rule=options.zero_count_rule,
        )
        seconds = time.perf_counter() - start
        stats.update(estimate_statistics(counts, estimated, decided.num_queries))
        stats.update(
            estimator_seconds=seconds,
            noise_std=options.noise_std,
            pseudo_count=options.pseudo_count,
            zero_count_rule=options.zero_count_rule,
        )
        return cls(run.student, run.task, run.optim, options=options, estimated_logits=estimated)

    def batch_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(super().batch_rows(batch), estimated_logits=self.estimated_logits[batch["idx"].cpu()])

    def targets_for(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        estimated = batch_rows(batch, "estimated_logits", self.estimated_logits)
        return scaled_softmax(estimated, self.options.logit_scale, self.options.temperature)


@full_precision
def scaled_softmax(logits: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """``softmax(s'·z / T)`` in float32 (also inside autocast)."""
    return torch.softmax(scale * logits / temperature, dim=-1)


def estimate_statistics(counts: torch.Tensor, estimated: torch.Tensor, num_queries: int) -> dict[str, Any]:
    """Spread of the estimated logits; the margin the zero-count rule gives an all-agree row."""
    sorted_counts = torch.sort(counts, dim=1, descending=True).values
    stats: dict[str, Any] = {
        "estimator_solved_vectors": int(torch.unique(sorted_counts, dim=0).shape[0]),
        "estimated_logit_abs_max": float(estimated.abs().max()) if estimated.numel() else 0.0,
        "estimated_top_margin_mean": float(
            (
                torch.sort(estimated, dim=1, descending=True).values[:, 0]
                - torch.sort(estimated, dim=1, descending=True).values[:, 1]
            ).mean()
        )
        if estimated.numel() and estimated.shape[1] > 1
        else 0.0,
    }
    agree = counts.max(dim=1).values == num_queries
    if bool(agree.any()) and estimated.shape[1] > 1:
        row = estimated[agree.nonzero()[0, 0]].sort(descending=True).values
        stats["all_agree_margin"] = float(row[0] - row[1])
    return stats


class DecisionHard(DecisionDistillation):
    """``decision_hard``: the teacher's top-1 label on the original input as the target."""

    method_name = "decision_hard"

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: DecisionOptions
    ) -> "DecisionHard":
        targets = hard_targets(decided.original_decisions, decided.num_labels)
        return cls(run.student, run.task, run.optim, options=options, targets=targets)


class DecisionLabelSmooth(DecisionDistillation):
    """``decision_label_smooth``: the top-1 label smoothed (``1 - eps`` / ``eps`` over the other classes)."""

    method_name = "decision_label_smooth"
    Options = LabelSmoothOptions

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: LabelSmoothOptions
    ) -> "DecisionLabelSmooth":
        if options.smoothing_form == "uniform":
            targets = uniform_smoothed_targets(
                decided.original_decisions, decided.num_labels, options.smoothing, options.temperature
            )
        else:
            targets = label_smoothed_targets(decided.original_decisions, decided.num_labels, options.smoothing)
        stats["smoothing"] = options.smoothing
        stats["smoothing_form"] = options.smoothing_form
        return cls(run.student, run.task, run.optim, options=options, targets=targets)


class DecisionNoiseSmooth(DecisionDistillation):
    """``decision_noise_smooth``: the decision frequencies ``p̂ = c / N`` as the target."""

    method_name = "decision_noise_smooth"

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: DecisionOptions
    ) -> "DecisionNoiseSmooth":
        targets = noise_smoothed_targets(decided.counts)
        return cls(run.student, run.task, run.optim, options=options, targets=targets)


class DecisionSurrogate(DecisionDistillation):
    """``decision_surrogate``: a student-sized surrogate trained on the teacher's decisions gives the soft labels.

    The surrogate copies the student's initialisation and is trained with CE on the teacher's top-1
    decisions for the training originals (`kdexp.decision.surrogate`); the student is then distilled
    from ``q = softmax(z_surrogate / T)`` in DBKD's loss. Its logits are cached by key.
    """

    method_name = "decision_surrogate"
    Options = SurrogateOptions

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: SurrogateOptions
    ) -> "DecisionSurrogate":
        logits = cached_surrogate_logits(run, decided, options)
        decisions = decided.original_decisions
        stats["surrogate_agreement_with_teacher"] = float((logits.argmax(-1) == decisions).float().mean())
        targets = torch.softmax(logits / options.temperature, dim=-1)
        return cls(run.student, run.task, run.optim, options=options, targets=targets)


def cached_surrogate_logits(run: "RunContext", decided: DecisionQueries, options: SurrogateOptions) -> torch.Tensor:
    """The surrogate's logits on the training originals: computed once per key, then read from the cache."""
    split = run.task.train_split
    tokenized = run.data.tokenized[split]
    optim = run.optim
    settings = SurrogateSettings(
        options.surrogate_epochs,
        options.surrogate_learning_rate or optim.learning_rate,
        int(run.cfg.data.batch_size),
        optim.weight_decay,
        optim.warmup_ratio,
        int(run.cfg.seed),
    )
    key = cache_key(
        kind="surrogate_logits",
        decisions=decided.key,
        student=state_fingerprint(run.student),
        data=run.data.keys[split],
        settings=asdict(settings),
        **run.teacher.batching.key_parts(),
        **({} if run.hardware.precision == "32-true" else {"precision": run.hardware.precision}),
    )
    path = run.data.cache_dir / "signals" / "surrogate_logits" / f"{key}.pt"
    expected = {"key": key, "rows": len(tokenized)}

    def load() -> torch.Tensor | None:
        cached = load_tensors(path, expected)
        return None if cached is None else cached["logits"]

    def compute() -> torch.Tensor:
        started = time.perf_counter()
        hardware = run.hardware.single_device()
        model = train_surrogate(
            run.student, tokenized, decided.original_decisions, run.data.pad_token_id, settings, hardware
        )
        logits = logits_of(model, tokenized, run.data.pad_token_id, decided.num_labels, hardware, run.teacher.batching)
        save_tensors(path, {"logits": logits}, expected)
        log.info(
            "Surrogate trained on the teacher's decisions (%d rows, %d epochs) in %.1fs",
            len(tokenized),
            settings.epochs,
            time.perf_counter() - started,
        )
        return logits

    return load_or_compute(path, load, compute)


class DecisionHardAug(DecisionDistillation):
    """``decision_hard_aug``: hard labels on the originals and on the augmented copies (extra examples).

    The training set of the run becomes the original rows (``idx`` ``0..n-1``) followed by the
    copies (``idx`` ``n..``), tokenised with the run's tokenizer and cached by
    :func:`kdexp.data.tokenize_split`. The run's ``TaskData`` is replaced (not mutated) in the
    run context, which is what the run's data module reads.
    """

    method_name = "decision_hard_aug"
    Options = HardAugOptions

    @classmethod
    def from_decisions(
        cls, run: "RunContext", decided: DecisionQueries, stats: dict[str, Any], options: HardAugOptions
    ) -> "DecisionHardAug":
        n, num_copies = decided.num_examples, decided.num_queries - 1
        copies_per_example = options.copies_per_example
        use = num_copies if copies_per_example is None else min(int(copies_per_example), num_copies)
        task, data = run.task, run.data
        original = data.train
        targets = [hard_targets(decided.original_decisions, decided.num_labels)]
        if use > 0 and n > 0:
            copies = decided.copies()
            if use < num_copies:
                copies = copies.filter(lambda batch: [c <= use for c in batch["copy"]], batched=True)
            rows, numbers = (torch.from_numpy(arrow_column(copies, name).to_numpy()) for name in ("row", "copy"))
            labels = decided.decisions[rows, numbers]
            raw = copies_as_raw(copies, task).add_column("label", labels.numpy())
            copies_form = replace(
                data.inputs, cut_long_options=True
            )  # the original's form; a copy EDA made too long is cut
            tokenized, copies_key = tokenize_split(
                raw, task, data.tokenizer, data.max_length, data.cache_dir, inputs=copies_form
            )
            tokenized = tokenized.remove_columns("idx").add_column("idx", np.arange(n, n + len(tokenized)))
            if tokenized.features != original.features:
                tokenized = tokenized.cast(original.features)
            train = datasets.concatenate_datasets([original, tokenized])
            targets.append(hard_targets(labels, decided.num_labels))
            keys = dict(
                data.keys,
                **{
                    task.train_split: cache_key(
                        kind="hard_aug_train", original=data.keys[task.train_split], copies=copies_key
                    )
                },
            )
            run.data = replace(data, tokenized=dict(data.tokenized, **{task.train_split: train}), keys=keys)
        stats.update(extra_examples=len(run.data.train) - n, copies_per_example=use)
        return cls(run.student, run.task, run.optim, options=options, targets=torch.cat(targets), num_original=n)
