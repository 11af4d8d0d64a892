"""The masked language model (MLM) teacher of text smoothing: loading it safely, and training a head.

Text smoothing needs ``q_t = softmax(MLM(x)_t / tau)`` from an MLM that shares the
student's vocabulary. Two ways to get a wrong ``q_t`` silently are refused here:

- a checkpoint without MLM head weights (``transformers`` would initialise the head
  at random and only log a warning): :func:`load_mlm_teacher` raises
  :class:`MissingMLMHeadError`;
- an MLM whose vocabulary differs from the student's (``q_t`` would index other
  tokens): :func:`load_mlm_teacher` raises :class:`VocabularyMismatchError`.

For encoders published without an MLM head (e.g. sentence-transformers checkpoints),
:func:`adapt_mlm_head` is the MLM adaptation stage: it trains a head (optionally the
encoder too) on the task's own text and returns a model whose ``save_pretrained``
output :func:`load_mlm_teacher` accepts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging
from transformers.utils.hub import cached_file

from kdexp.cache import atomic_torch_save
from kdexp.faults import maybe_fail
from kdexp.hardware import Hardware
from kdexp.losses.precision import full_precision
from kdexp.model_internals import model_inputs
from kdexp.preemption import CheckpointClock, CheckpointEvery, Preempted, deferring, stop_requested
from kdexp.smoothing.heads import head_parameters, masked_lm_head

logger = logging.getLogger(__name__)

VocabularySource = PreTrainedTokenizerBase | Mapping[str, int]
# A training text of the adaptation stage: one sentence, or a sentence pair (tokenised as the
# task's input is, ``[CLS] a [SEP] b [SEP]`` with segment ids 0 and 1).
Text = str | tuple[str, str]

IGNORED_LABEL = -100
METRICS_FILE_NAME = "mlm_adaptation_metrics.json"
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


class MissingMLMHeadError(ValueError):
    """The checkpoint lacks trained MLM head weights; loading it would give a random head."""


class VocabularyMismatchError(ValueError):
    """The MLM teacher's vocabulary is not the student's, or cannot be checked."""


def load_mlm_teacher(
    name_or_path: str | os.PathLike, expected_vocab: VocabularySource | None = None
) -> PreTrainedModel:
    """Load a masked language model to serve as the frozen text-smoothing teacher.

    Refuses (:class:`MissingMLMHeadError`) a checkpoint from which any weight of the
    model is missing, in particular the MLM head (``cls.predictions.transform.*``,
    ``cls.predictions.bias``). A decoder weight tied to the word embeddings is not
    missing: ``transformers`` ties it to the loaded embeddings and does not report it.

    With ``expected_vocab`` (the student's tokenizer, or its ``get_vocab()`` dict), the
    tokenizer saved with the checkpoint must have exactly that vocabulary, else
    :class:`VocabularyMismatchError`.

    Returns the model in eval mode with gradients disabled.
    """
    if expected_vocab is not None:
        check_same_vocabulary(
            teacher_vocab=_saved_vocabulary(name_or_path),
            student_vocab=_as_vocabulary(expected_vocab),
            teacher_name=str(name_or_path),
        )
    with _own_missing_weights_report():
        model, loading_info = AutoModelForMaskedLM.from_pretrained(
            name_or_path, output_loading_info=True, dtype=torch.float32
        )
    masked_lm_head(model)  # refuses, in one line, a family whose head kdexp cannot read
    missing_keys = sorted(loading_info["missing_keys"])
    if missing_keys:
        raise MissingMLMHeadError(_missing_weights_message(name_or_path, missing_keys, model.base_model_prefix))
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def _own_missing_weights_report() -> Iterator[None]:
    """Silence transformers' load report: the caller checks the missing keys and reports them itself."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _missing_weights_message(name_or_path: str | os.PathLike, missing_keys: list[str], base_prefix: str) -> str:
    head_keys = [key for key in missing_keys if not key.startswith(f"{base_prefix}.")]
    encoder_keys = [key for key in missing_keys if key.startswith(f"{base_prefix}.")]
    message = (
        f"Refusing to use '{name_or_path}' as the MLM teacher: the checkpoint lacks weights that "
        f"transformers would initialise at random. "
    )
    if head_keys:
        message += f"Missing MLM head weights: {', '.join(head_keys)}. "
    if encoder_keys:
        message += f"Missing encoder weights: {', '.join(encoder_keys)}. "
    return message + (
        "What would work: pick a checkpoint saved with its MLM head (a *ForMaskedLM model, "
        "e.g. bert-base-uncased), or run the MLM adaptation stage "
        "(kdexp.smoothing.adapt_mlm_head) to train a head for this encoder on the task's text, "
        "and use the checkpoint it saves."
    )


def check_same_vocabulary(
    teacher_vocab: Mapping[str, int],
    student_vocab: Mapping[str, int],
    teacher_name: str,
    student_name: str = "the student's tokenizer",
) -> None:
    """Raise :class:`VocabularyMismatchError` unless both token-to-id maps are identical."""
    if dict(teacher_vocab) == dict(student_vocab):
        return
    differing = sorted(
        token
        for token in set(teacher_vocab) | set(student_vocab)
        if teacher_vocab.get(token) != student_vocab.get(token)
    )
    examples = ", ".join(
        f"{token!r}: {teacher_vocab.get(token)} vs {student_vocab.get(token)}" for token in differing[:5]
    )
    raise VocabularyMismatchError(
        f"The MLM teacher '{teacher_name}' and {student_name} have different vocabularies "
        f"(teacher: {len(teacher_vocab)} tokens, sha256 {vocabulary_fingerprint(teacher_vocab)[:16]}; "
        f"student: {len(student_vocab)} tokens, sha256 {vocabulary_fingerprint(student_vocab)[:16]}; "
        f"{len(differing)} tokens differ, e.g. {examples} as teacher id vs student id). "
        "Text smoothing mixes the teacher's distribution into the student's embeddings token by "
        "token, so both must use one tokenizer: pick an MLM teacher from the student's model family, "
        "or train a head for the student's own encoder with the MLM adaptation stage."
    )


def vocabulary_fingerprint(vocab: Mapping[str, int]) -> str:
    """SHA-256 of the token-to-id map, independent of its order."""
    canonical = json.dumps(sorted(vocab.items()), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _as_vocabulary(source: VocabularySource) -> dict[str, int]:
    if isinstance(source, PreTrainedTokenizerBase):
        return source.get_vocab()
    return dict(source)


def _saved_vocabulary(name_or_path: str | os.PathLike) -> dict[str, int]:
    cannot_check = (
        f"Cannot check the vocabulary of the MLM teacher '{name_or_path}': no tokenizer is saved with it. "
        "Save the tokenizer next to the model (tokenizer.save_pretrained(path), as MLMAdaptation.save "
        "does), or load without expected_vocab."
    )
    # Without tokenizer files, transformers 5 builds a default tokenizer of special tokens only
    # from config.json, which would be compared as if it were the teacher's vocabulary.
    if not _has_tokenizer_files(name_or_path):
        raise VocabularyMismatchError(cannot_check)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise VocabularyMismatchError(f"{cannot_check} ({error.__class__.__name__}: {error})") from error
    return tokenizer.get_vocab()


def _has_tokenizer_files(name_or_path: str | os.PathLike) -> bool:
    return any(
        cached_file(
            name_or_path,
            file_name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        is not None
        for file_name in TOKENIZER_FILE_NAMES
    )


@dataclass
class MLMAdaptation:
    """Result of :func:`adapt_mlm_head`: the MLM, the tokenizer it was trained with, and its metrics."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write model, tokenizer and metrics so that ``load_mlm_teacher(directory, tokenizer)`` accepts them."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / METRICS_FILE_NAME).write_text(json.dumps(self.metrics, indent=2, sort_keys=True))
        return directory


@dataclass(frozen=True)
class MaskedBatch:
    """MLM inputs: ``input_ids`` after masking, and ``labels`` (the original id where masked, else -100).

    ``token_type_ids`` (segment ids) is set for sentence pairs; None means all zeros.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    token_type_ids: Tensor | None = None


def select_mask_positions(maskable: Tensor, mask_prob: float, generator: torch.Generator) -> Tensor:
    """Choose each maskable position with probability ``mask_prob``, and at least one per sequence.

    The at-least-one rule matters for short sentences: without it, most of a
    ten-token sentence set would carry no prediction target at all.
    """
    selected = (torch.rand(maskable.shape, generator=generator) < mask_prob) & maskable
    needs_one = maskable.any(dim=-1) & ~selected.any(dim=-1)
    scores = torch.rand(maskable.shape, generator=generator).masked_fill(~maskable, -1.0)
    forced = F.one_hot(scores.argmax(dim=-1), maskable.shape[-1]).bool() & needs_one.unsqueeze(-1)
    return selected | forced


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    special_tokens_mask: Tensor,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float,
    generator: torch.Generator,
) -> MaskedBatch:
    """BERT's 80/10/10 masking: of the selected positions, 80% become ``[MASK]``, 10% a random token, 10% stay."""
    maskable = attention_mask.bool() & ~special_tokens_mask.bool()
    selected = select_mask_positions(maskable, mask_prob, generator)
    labels = input_ids.masked_fill(~selected, IGNORED_LABEL)
    draw = torch.rand(input_ids.shape, generator=generator)
    to_mask_token = selected & (draw < 0.8)
    to_random_token = selected & (draw >= 0.8) & (draw < 0.9)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked_ids = input_ids.masked_fill(to_mask_token, mask_token_id)
    masked_ids = torch.where(to_random_token, random_tokens, masked_ids)
    return MaskedBatch(masked_ids, attention_mask, labels)


def _pad(sequences: Sequence[Sequence[int]], pad_value: int) -> Tensor:
    longest = max(len(sequence) for sequence in sequences)
    return torch.tensor([list(sequence) + [pad_value] * (longest - len(sequence)) for sequence in sequences])


TOKENIZE_BATCH = 8192  # texts per tokenizer call: its Python lists live only this long


@dataclass(frozen=True)
class _TokenizedTexts:
    """Token ids of many texts packed flat (text ``i`` is ``offsets[i]:offsets[i + 1]``), with their special-token
    mask and, for pairs, segment ids: a few bytes a token, where Python lists of RACE's passages would take GBs."""

    input_ids: np.ndarray  # int32
    special_tokens_mask: np.ndarray  # int8
    offsets: np.ndarray  # int64, one more than the texts
    token_type_ids: np.ndarray | None = None  # int8

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _rows(self, values: np.ndarray, indices: Sequence[int]) -> list[list[int]]:
        return [values[self.offsets[i] : self.offsets[i + 1]].tolist() for i in indices]

    def masked_batch(
        self, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase, mask_prob: float, generator: torch.Generator
    ) -> MaskedBatch:
        input_ids = _pad(self._rows(self.input_ids, indices), tokenizer.pad_token_id)
        attention_mask = _pad([[1] * int(self.offsets[i + 1] - self.offsets[i]) for i in indices], 0)
        special_tokens_mask = _pad(self._rows(self.special_tokens_mask, indices), 1)
        masked = mask_tokens(
            input_ids,
            attention_mask,
            special_tokens_mask,
            tokenizer.mask_token_id,
            len(tokenizer),
            mask_prob,
            generator,
        )
        if self.token_type_ids is None:
            return masked
        token_type_ids = _pad(self._rows(self.token_type_ids, indices), 0)
        return MaskedBatch(masked.input_ids, masked.attention_mask, masked.labels, token_type_ids)


def _flat(rows: Sequence[Sequence[int]], dtype: Any) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype)


def _tokenize(texts: Sequence[Text], tokenizer: PreTrainedTokenizerBase, max_length: int) -> _TokenizedTexts:
    """Token ids of the texts that have at least one ordinary (maskable) token, `TOKENIZE_BATCH` texts at a time.

    Sentence pairs (tuples) are tokenised together, as a pair task's input is, and keep
    their segment ids; all texts must then be pairs.
    """
    pairs = [isinstance(text, (tuple, list)) for text in texts]
    if any(pairs) and not all(pairs):
        raise ValueError("the adaptation texts must be all single sentences or all sentence pairs")
    with_pairs = bool(pairs) and pairs[0]
    ids, specials, segments, lengths = [], [], [], []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        part = texts[start : start + TOKENIZE_BATCH]
        if with_pairs:
            encoded = tokenizer(
                [text[0] for text in part],
                [text[1] for text in part],
                truncation=True,
                max_length=max_length,
                return_special_tokens_mask=True,
                return_token_type_ids=True,
            )
        else:
            encoded = tokenizer(list(part), truncation=True, max_length=max_length, return_special_tokens_mask=True)
        kept = [i for i, special in enumerate(encoded["special_tokens_mask"]) if not all(special)]
        ids.append(_flat([encoded["input_ids"][i] for i in kept], np.int32))
        specials.append(_flat([encoded["special_tokens_mask"][i] for i in kept], np.int8))
        if with_pairs:
            segments.append(_flat([encoded["token_type_ids"][i] for i in kept], np.int8))
        lengths.append(np.array([len(encoded["input_ids"][i]) for i in kept], dtype=np.int64))
    offsets = np.zeros(sum(len(part) for part in lengths) + 1, dtype=np.int64)
    if len(offsets) > 1:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return _TokenizedTexts(
        np.concatenate(ids) if ids else np.zeros(0, np.int32),
        np.concatenate(specials) if specials else np.zeros(0, np.int8),
        offsets,
        np.concatenate(segments) if with_pairs and segments else None,
    )


def masked_lm_loss_and_predictions(model: PreTrainedModel, batch: MaskedBatch) -> tuple[Tensor, Tensor]:
    """Cross-entropy at the masked positions, and the model's predictions there.

    The vocabulary projection runs only on the masked positions (about 15% of the
    tokens): it is the most expensive part of the MLM head.
    """
    inputs = model_inputs(
        {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "token_type_ids": batch.token_type_ids},
        model.base_model,
    )
    hidden_states = model.base_model(**inputs).last_hidden_state
    targets = batch.labels != IGNORED_LABEL
    logits = masked_lm_head(model)(hidden_states[targets])
    labels = batch.labels[targets]
    return masked_token_cross_entropy(logits, labels), logits.argmax(dim=-1)


@full_precision
def masked_token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """CE over the vocabulary, in float32 also under mixed precision."""
    return F.cross_entropy(logits, labels)


def _move(batch: MaskedBatch, hardware: Hardware) -> MaskedBatch:
    token_type_ids = hardware.to_device(batch.token_type_ids) if batch.token_type_ids is not None else None
    return MaskedBatch(
        hardware.to_device(batch.input_ids),
        hardware.to_device(batch.attention_mask),
        hardware.to_device(batch.labels),
        token_type_ids,
    )


@torch.no_grad()
def evaluate_masked_lm(
    model: PreTrainedModel, batches: Sequence[MaskedBatch], hardware: Hardware | None = None
) -> dict[str, float | int]:
    """Masked-token accuracy and mean cross-entropy over fixed masked batches (all masked positions)."""
    hardware = hardware or Hardware()
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches:
        batch = _move(batch, hardware)
        with hardware.autocast():
            loss, predictions = masked_lm_loss_and_predictions(model, batch)
        labels = batch.labels[batch.labels != IGNORED_LABEL]
        correct += int((predictions == labels).sum())
        total += labels.numel()
        loss_sum += float(loss) * labels.numel()
    model.train(was_training)
    return {"masked_token_accuracy": correct / total, "masked_lm_loss": loss_sum / total, "masked_tokens": total}


def adapt_mlm_head(
    encoder_path: str | os.PathLike,
    texts: Sequence[Text],
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_encoder: bool = False,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    encoder_learning_rate: float = 5e-5,
    max_length: int = 64,
    mask_prob: float = 0.15,
    heldout_fraction: float = 0.1,
    heldout_groups: Sequence[str] | None = None,
    seed: int = 0,
    hardware: Hardware | None = None,
    log_every: int = 50,
    eval_every: int | None = None,
    checkpoints: "AdaptationCheckpoints | None" = None,
) -> MLMAdaptation:
    """The MLM adaptation stage: give an encoder that has no MLM head a trained one.

    Builds the family's ``*ForMaskedLM`` from ``encoder_path`` (BERT, RoBERTa, ELECTRA,
    DistilBERT: `kdexp.smoothing.heads`), on ``hardware`` (default: the CPU, float32); head weights absent from the
    checkpoint are initialised fresh (deliberately, since they are trained next), while
    any missing encoder weight is an error. Trains the head (``cls.predictions.transform``
    and the output bias; the decoder stays tied to the word embeddings) with AdamW at
    ``learning_rate``, and with ``train_encoder`` also the encoder at
    ``encoder_learning_rate``, for ``steps`` batches of ``batch_size`` texts with BERT's
    80/10/10 masking of ``mask_prob`` of the tokens.

    ``texts`` are single sentences, or ``(first, second)`` pairs for pair tasks: a pair is
    tokenised as the task's input is (with segment ids), so the MLM is trained on the input
    form it will read when it smooths that input.

    A ``heldout_fraction`` of ``texts`` (shuffled with ``seed``) is kept out of training
    (with ``heldout_groups``, one group name per text, whole groups are: questions that share a
    passage share it, and a passage seen in training would make the held-out accuracy a memory test)
    and masked once, with a generator seeded by ``seed``, so the accuracy before and
    after training is measured on the same masked tokens.

    Metrics: ``masked_token_accuracy`` and ``masked_lm_loss`` on the held-out texts
    after training, ``initial_*`` the same before it, ``heldout_examples``,
    ``heldout_masked_tokens``, ``train_examples``, ``final_train_loss`` (mean over the
    last ``log_every`` steps), ``train_seconds``, and the settings used. With ``eval_every``,
    also ``heldout_curve``: ``[step, accuracy, loss]`` on the held-out texts every
    ``eval_every`` steps (its evaluation time is not counted in ``train_seconds``).

    With ``checkpoints`` the training loop saves a step checkpoint (model, optimiser, generator
    states, losses, curve) when one is due and when a stop signal arrives (then it raises
    `Preempted`), and a later call with the same checkpoints resumes from it: the adapted model
    is the one an uninterrupted adaptation gives.
    """
    _check_adaptation_settings(texts, tokenizer, steps, batch_size, mask_prob, heldout_fraction)
    hardware = hardware or Hardware()
    device = hardware.device
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model, head_initialisation = _masked_lm_from_encoder(encoder_path, tokenizer)
        model = hardware.to_device(model)
        heldout, train = _split_heldout(texts, tokenizer, max_length, heldout_fraction, seed, heldout_groups)
        heldout_batches = _fixed_masked_batches(heldout, tokenizer, batch_size, mask_prob, seed)
        initial = evaluate_masked_lm(model, heldout_batches, hardware)

        optimizer = hardware.optimizer(
            torch.optim.AdamW(_parameter_groups(model, train_encoder, learning_rate, encoder_learning_rate))
        )
        progress = AdaptationProgress()

        def evaluate_during_training(step: int) -> None:
            if eval_every and step % eval_every == 0 and step < steps:
                values = evaluate_masked_lm(model, heldout_batches, hardware)
                progress.curve.append([step, values["masked_token_accuracy"], values["masked_lm_loss"]])
                logger.info("MLM adaptation step %d: held-out masked-token accuracy %.4f", step, progress.curve[-1][1])

        train_losses = _train_masked_lm(
            model,
            train,
            tokenizer,
            optimizer,
            steps,
            batch_size,
            mask_prob,
            train_encoder,
            torch.Generator().manual_seed(seed + 1),
            log_every,
            evaluate_during_training,
            hardware,
            checkpoints,
            progress,
        )
        final = evaluate_masked_lm(model, heldout_batches, hardware)

    model.requires_grad_(True)
    model.eval()
    recent_losses = train_losses[-log_every:]
    metrics: dict[str, Any] = {
        "masked_token_accuracy": final["masked_token_accuracy"],
        "masked_lm_loss": final["masked_lm_loss"],
        "initial_masked_token_accuracy": initial["masked_token_accuracy"],
        "initial_masked_lm_loss": initial["masked_lm_loss"],
        "heldout_examples": len(heldout),
        "heldout_masked_tokens": final["masked_tokens"],
        "train_examples": len(train),
        "final_train_loss": sum(recent_losses) / len(recent_losses),
        "train_seconds": progress.train_seconds,
        "total_seconds": time.perf_counter() - started,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "encoder_learning_rate": encoder_learning_rate if train_encoder else 0.0,
        "train_encoder": train_encoder,
        "max_length": max_length,
        "mask_prob": mask_prob,
        "seed": seed,
        "head_initialisation": head_initialisation,
        "encoder_path": str(encoder_path),
    }
    if eval_every:
        metrics["heldout_curve"] = progress.curve
    return MLMAdaptation(model, tokenizer, metrics)


def _split_heldout(
    texts: Sequence[Text],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    heldout_fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> tuple[_TokenizedTexts, _TokenizedTexts]:
    """Shuffle with ``seed``, keep ``heldout_fraction`` of the texts out, tokenise both parts. With ``groups``
    (one per text) whole groups are kept out, in shuffled order, until the fraction is reached."""
    generator = torch.Generator().manual_seed(seed)
    num_heldout = max(1, round(heldout_fraction * len(texts)))
    if groups is not None and len(set(groups)) < 2:
        logger.warning("The MLM adaptation texts share one passage: its held-out texts are questions on that passage.")
        groups = None
    if groups is None:  # both parts in shuffled order: the adapted MLMs already cached were trained so
        order = torch.randperm(len(texts), generator=generator).tolist()
        heldout_order, train_order = order[:num_heldout], order[num_heldout:]
    else:
        kept_out = _whole_groups(groups, num_heldout, generator)
        heldout_order = [i for i in range(len(texts)) if i in kept_out]
        train_order = [i for i in range(len(texts)) if i not in kept_out]
    heldout = _tokenize([texts[i] for i in heldout_order], tokenizer, max_length)
    train = _tokenize([texts[i] for i in train_order], tokenizer, max_length)
    if len(heldout) == 0 or len(train) == 0:
        raise ValueError("after tokenisation, the held-out or the training texts have no ordinary tokens to mask")
    return heldout, train


def _whole_groups(groups: Sequence[str], num_heldout: int, generator: torch.Generator) -> set[int]:
    """The texts of whole groups, taken in shuffled group order until at least ``num_heldout``; never every group."""
    if len(groups) == 0:
        return set()
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    names = list(members)
    kept_out: set[int] = set()
    for g in torch.randperm(len(names), generator=generator).tolist()[: len(names) - 1]:
        if len(kept_out) >= num_heldout:
            break
        kept_out.update(members[names[g]])
    return kept_out


def _fixed_masked_batches(
    texts: _TokenizedTexts, tokenizer: PreTrainedTokenizerBase, batch_size: int, mask_prob: float, seed: int
) -> list[MaskedBatch]:
    """Mask once, deterministically, so every evaluation scores the same masked tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [
        texts.masked_batch(range(start, min(start + batch_size, len(texts))), tokenizer, mask_prob, generator)
        for start in range(0, len(texts), batch_size)
    ]


def _check_adaptation_settings(
    texts: Sequence[Text],
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    batch_size: int,
    mask_prob: float,
    heldout_fraction: float,
) -> None:
    if len(texts) < 2:
        raise ValueError(f"adapt_mlm_head needs at least 2 texts (training and held-out), got {len(texts)}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a mask token and a pad token for masked-LM training")


def _masked_lm_from_encoder(
    encoder_path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, str]:
    with _own_missing_weights_report():
        model, loading_info = AutoModelForMaskedLM.from_pretrained(
            encoder_path, output_loading_info=True, dtype=torch.float32
        )
    masked_lm_head(model)  # a family without a head kdexp can read is refused here, in one line
    missing_keys = sorted(loading_info["missing_keys"])
    missing_encoder_keys = [key for key in missing_keys if key.startswith(f"{model.base_model_prefix}.")]
    if missing_encoder_keys:
        raise ValueError(
            f"'{encoder_path}' is not a complete {model.config.model_type} encoder: missing "
            f"{', '.join(missing_encoder_keys)}. The MLM adaptation stage trains only a head on top of a "
            "pre-trained encoder."
        )
    if model.config.vocab_size < len(tokenizer):
        raise VocabularyMismatchError(
            f"The tokenizer has {len(tokenizer)} tokens but the encoder '{encoder_path}' embeds only "
            f"{model.config.vocab_size}: use the tokenizer saved with this encoder."
        )
    if missing_keys:
        logger.info("MLM adaptation: initialising the missing head weights %s fresh", ", ".join(missing_keys))
    return model, ("fresh" if missing_keys else "checkpoint")


def _parameter_groups(
    model: PreTrainedModel, train_encoder: bool, learning_rate: float, encoder_learning_rate: float
) -> list[dict]:
    encoder_parameters = list(model.base_model.parameters())
    # The decoder weight is the word-embedding matrix (tied), so it belongs to the encoder.
    model.base_model.requires_grad_(train_encoder)
    groups = [{"params": head_parameters(model), "lr": learning_rate}]
    if train_encoder:
        groups.append({"params": encoder_parameters, "lr": encoder_learning_rate})
    return groups


@dataclass
class AdaptationProgress:
    """What the adaptation loop has done (kept in its step checkpoints): steps, their losses, the held-out
    curve (``[step, accuracy, loss]``), and the seconds spent in training steps (evaluations excluded)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    curve: list[list[float]] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass(frozen=True)
class AdaptationCheckpoints:
    """Where the adaptation loop keeps its step checkpoint (``path``, replaced atomically), the adaptation
    it belongs to (``identity``: a checkpoint of another is set aside, never resumed), and when one is
    written besides at a stop signal (``every``: steps or minutes, kdexp.preemption)."""

    path: Path
    identity: str
    every: CheckpointEvery = field(default_factory=CheckpointEvery)


def _train_masked_lm(
    model: PreTrainedModel,
    train: _TokenizedTexts,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    mask_prob: float,
    train_encoder: bool,
    generator: torch.Generator,
    log_every: int,
    after_step: Callable[[int], None] | None = None,
    hardware: Hardware | None = None,
    checkpoints: AdaptationCheckpoints | None = None,
    progress: AdaptationProgress | None = None,
) -> list[float]:
    """Plain loop: sample batches epoch by epoch, mask afresh each time, one AdamW step per batch.

    With ``checkpoints`` it resumes from their step checkpoint when there is one, and writes one
    before a step when due, and when a stop signal arrived (then it raises `Preempted`).
    """
    hardware = hardware or Hardware()
    progress = progress if progress is not None else AdaptationProgress()
    # A frozen encoder runs without dropout, so the head learns the features it will see at use.
    model.train(train_encoder)
    batch_size = min(batch_size, len(train))
    batches_per_epoch = len(train) // batch_size
    saver = _AdaptationSaver(checkpoints, model, optimizer, generator, hardware, progress) if checkpoints else None
    order = saver.resume() if saver is not None else []
    with deferring() if saver is not None else nullcontext():
        for step in range(progress.step, steps):
            if saver is not None:
                saver.at_boundary(order)
            maybe_fail("mlm_adapt_step", step=step)
            started = time.perf_counter()
            if step % batches_per_epoch == 0:
                order = torch.randperm(len(train), generator=generator).tolist()
            start = (step % batches_per_epoch) * batch_size
            rows = order[start : start + batch_size]
            batch = _move(train.masked_batch(rows, tokenizer, mask_prob, generator), hardware)
            with hardware.autocast():
                loss, _ = masked_lm_loss_and_predictions(model, batch)
            optimizer.zero_grad(set_to_none=True)
            hardware.backward(loss)
            optimizer.step()
            progress.losses.append(loss.item())
            progress.step = step + 1
            progress.train_seconds += time.perf_counter() - started
            if log_every and (step + 1) % log_every == 0:
                recent = progress.losses[-log_every:]
                logger.info("MLM adaptation step %d/%d: loss %.4f", step + 1, steps, sum(recent) / log_every)
            if after_step is not None:
                after_step(step + 1)
        if saver is not None:
            saver.at_end(order)
    losses = progress.losses
    if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"MLM adaptation diverged (loss {losses[-1]}): lower learning_rate")
    return losses


class _AdaptationSaver:
    """The adaptation loop's step checkpoints: the model, optimiser (and fp16 loss scaler), the masking
    generator, the global generators (dropout), the epoch's text order and the progress."""

    def __init__(
        self,
        checkpoints: AdaptationCheckpoints,
        model: PreTrainedModel,
        optimizer: Any,
        generator: torch.Generator,
        hardware: Hardware,
        progress: AdaptationProgress,
    ):
        self.checkpoints = checkpoints
        self.path = Path(checkpoints.path)
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.hardware, self.progress = hardware, progress
        self.clock = CheckpointClock(checkpoints.every)
        self.resumed_step: int | None = None
        self.last_saved: str | None = None

    def resume(self) -> list[int]:
        """Load the step checkpoint if there is one for this adaptation; the text order of its epoch."""
        state = self._read()
        if state is None:
            return []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.hardware.fabric.strategy.precision.load_state_dict(state["precision"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.hardware.device)
        saved = state["progress"]
        self.progress.step, self.progress.train_seconds = int(saved["step"]), float(saved["train_seconds"])
        self.progress.losses[:] = [float(x) for x in saved["losses"]]
        self.progress.curve[:] = [list(point) for point in saved["curve"]]
        self.resumed_step = self.progress.step
        self.last_saved = f"the MLM adaptation's checkpoint at step {self.progress.step} in {self.path}"
        logger.info("MLM adaptation: resuming from %s at step %d", self.path, self.progress.step)
        return [int(i) for i in state["order"]]

    def _read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # cut short by a kill during a save that was not atomic, a disk error
            logger.warning("%s is unreadable (%s); adapting from the start.", self.path, err)
            self.path.rename(self.path.with_name(self.path.name + ".corrupt"))
            return None
        if state.get("identity") != self.checkpoints.identity:
            logger.warning("%s belongs to another adaptation; adapting from the start.", self.path)
            self.path.rename(self.path.with_name(self.path.name + ".other"))
            return None
        return state

    def at_boundary(self, order: list[int]) -> None:
        """Before a step: save when due or stopped (not where the run starts or resumed); stop if signalled."""
        step = self.progress.step
        stop = stop_requested()
        if (stop or self.clock.due(step)) and step > 0 and step != self.resumed_step:
            self._save(order)
        if stop:
            raise Preempted(stop, self.last_saved)

    def at_end(self, order: list[int]) -> None:
        """After the last step: a signal that came during it stops here, with every step saved."""
        stop = stop_requested()
        if stop:
            if self.progress.step != self.resumed_step:
                self._save(order)
            raise Preempted(stop, self.last_saved)

    def _save(self, order: list[int]) -> None:
        rng = {"torch": torch.get_rng_state()}
        if self.hardware.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.hardware.device)
        progress = self.progress
        state = {
            "identity": self.checkpoints.identity,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "precision": self.hardware.fabric.strategy.precision.state_dict(),
            "generator": self.generator.get_state(),
            "rng": rng,
            "order": list(order),
            "progress": {
                "step": progress.step,
                "losses": list(progress.losses),
                "curve": list(progress.curve),
                "train_seconds": progress.train_seconds,
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.path, state)
        self.clock.saved()
        self.last_saved = f"an MLM adaptation checkpoint at step {progress.step} in {self.path}"
