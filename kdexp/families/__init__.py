"""Task families beside GLUE's classification: what differs between them, behind one seam.

A task (`kdexp.tasks`) is data: a family, columns, labels, sources. A family owns reading, turning
a row into model inputs, the model head, and scoring:

- classification (GLUE, own files): one sequence (or pair) per row, `AutoModelForSequenceClassification`;
- multiple choice (DREAM, RACE): one sequence per option (encoders, `AutoModelForMultipleChoice`), or a
  prompt read by a decoder LM through label words (`kdexp.families.label_words`);
- extractive QA (SQuAD v1.1, v2.0): strided windows of the passage, `AutoModelForQuestionAnswering`.

Methods see a family only through its logits: ``[B, C]`` over labels or options, or ``[B, 2, L]``
(the start and end distributions of extractive QA, positions outside the passage masked), with
targets ``[B]`` or ``[B, 2]``. Every loss that flattens to one distribution per row of its last
dimension (cross-entropy, soft-label KD, DBKD's targets over options) then needs no family code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import datasets
import torch

from kdexp.errors import DataError, ModelError
from kdexp.families import extractive_qa, multiple_choice
from kdexp.families.label_words import LabelWordChoiceModel, is_causal_lm, label_word_ids
from kdexp.tasks import CLASSIFICATION, EXTRACTIVE_QA, MULTIPLE_CHOICE, GlueTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["featurizer", "input_form", "load_head_model", "output_logits", "read_local_split", "read_hub_split"]


# --------------------------------------------------------------------------- reading


def read_local_split(task: GlueTask, split: str, mrc_dir: Path | None) -> datasets.Dataset | None:
    """An MRC split from one's own file (`task.files`) or the official release under `mrc_dir`; None if neither."""
    if task.files:
        path = Path(task.files["train" if split == task.train_split else "validation"])
    elif mrc_dir is not None and split in task.local_files:
        path = mrc_dir / task.local_dir / task.local_files[split]
    else:
        return None
    if not path.exists():
        raise DataError(
            f"{path} does not exist: the {task.name} release's {split} file under MRC_DIR "
            f"(data.mrc_dir={mrc_dir}), or task.train_file / task.dev_file."
        )
    if task.family == EXTRACTIVE_QA:
        return extractive_qa.refuse_unanswerable_in_v1(
            extractive_qa.read_squad(path, task.dev_articles, split), task, path
        )
    if task.files:
        return multiple_choice.read_own_file(path, task.num_labels)
    if task.name == "race":
        return multiple_choice.read_race_folder(path, task.num_labels)
    return multiple_choice.read_dream_json(path, task.num_labels)


def read_hub_split(task: GlueTask, split: str, hub_dataset: Callable[..., datasets.Dataset]) -> datasets.Dataset:
    """An MRC split from the task's own Hub dataset (read by `hub_dataset(name, config, split, revision)`), in the family's
    columns."""
    assert task.hub_dataset is not None
    ds = hub_dataset(task.hub_dataset, task.hub_config or None, split, task.hub_revision)
    if task.family == EXTRACTIVE_QA:
        return extractive_qa.from_hub(ds)
    return multiple_choice.from_hub(ds, task.hub_dataset, task.num_labels)


# --------------------------------------------------------------------------- model inputs


def input_form(model_config: Any) -> str:
    """How a model reads a multiple-choice row: `prompt` for a decoder LM, `pairs` for an encoder."""
    return "prompt" if is_causal_lm(model_config) else "pairs"


def featurizer(
    task: GlueTask,
    tokenizer: Any,
    max_length: int,
    form: str = "pairs",
    doc_stride: int = 128,
    cut_long_options: bool = False,
) -> Callable[[Mapping[str, list]], dict[str, list]]:
    """The `datasets.map` function (batched) that turns raw rows of `task` into model inputs and ``labels``."""
    if task.family == MULTIPLE_CHOICE:
        make = multiple_choice.prompts if form == "prompt" else multiple_choice.option_pairs
        return lambda batch: make(batch, tokenizer, max_length, cut_long_options)
    if task.family == EXTRACTIVE_QA:
        return lambda batch: extractive_qa.windows(batch, tokenizer, max_length, doc_stride)

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        encoded = tokenizer(*(batch[f] for f in task.text_fields), truncation=True, max_length=max_length)
        if "label" in batch:
            encoded["labels"] = batch["label"]
        return dict(encoded)

    return encode


# --------------------------------------------------------------------------- models


def auto_class(task: GlueTask, config: Any) -> Any:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMultipleChoice,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    if is_causal_lm(config):
        if task.family != MULTIPLE_CHOICE:
            raise ModelError(
                f"a decoder LM ({config.model_type}) answers multiple choice through label words; for "
                f"{task.name} ({task.family}) use an encoder (BERT, RoBERTa, ELECTRA, DistilBERT)."
            )
        return AutoModelForCausalLM
    return {
        CLASSIFICATION: AutoModelForSequenceClassification,
        MULTIPLE_CHOICE: AutoModelForMultipleChoice,
        EXTRACTIVE_QA: AutoModelForQuestionAnswering,
    }[task.family]


def load_head_model(
    name_or_path: str,
    task: GlueTask,
    config: Any,
    dtype: torch.dtype,
    attn_implementation: str,
    require_head: bool,
    label_config: dict[str, Any],
) -> tuple[PreTrainedModel, list[str]]:
    """The model of `task`'s family from a checkpoint (a decoder LM wrapped to answer through label words),
    and the head weights the checkpoint lacked (for `require_head`)."""
    auto = auto_class(task, config)
    extra = label_config if task.family == CLASSIFICATION else {}
    model, info = auto.from_pretrained(
        name_or_path,
        attn_implementation=attn_implementation,
        dtype=dtype,
        ignore_mismatched_sizes=not require_head,
        output_loading_info=True,
        **extra,
    )
    base = f"{model.base_model_prefix}."
    missing_head = [k for k in info["missing_keys"] if not k.startswith(base) and "lm_head" not in k]
    if is_causal_lm(config):
        model = _answering_through_label_words(model, task, name_or_path)
        missing_head = []  # the LM head is the head: label words need nothing new
    return model, missing_head


def new_head_model(
    task: GlueTask, config: Any, attn_implementation: str, dtype: torch.dtype, tokenizer_path: str
) -> PreTrainedModel:
    """A randomly initialised model of `task`'s family from `config` (`student.init=random`); a decoder reads the
    label words of the tokenizer at `tokenizer_path`."""
    model = auto_class(task, config).from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    if not is_causal_lm(config):
        return model
    return _answering_through_label_words(model, task, tokenizer_path)


def _answering_through_label_words(lm: PreTrainedModel, task: GlueTask, tokenizer_path: str) -> PreTrainedModel:
    """`lm` answering `task`'s options through the label words of the tokenizer at `tokenizer_path`. The wrapper
    is no PreTrainedModel but stands in for one (config, forward, input embeddings, save_pretrained)."""
    from transformers import AutoTokenizer

    words = multiple_choice.label_words(task.num_labels)
    wrapped = LabelWordChoiceModel(lm, label_word_ids(AutoTokenizer.from_pretrained(tokenizer_path), words))
    return cast("PreTrainedModel", wrapped)


def output_logits(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A model output as the family's logits: ``[B, C]``, or ``[B, 2, L]`` for extractive QA (masked)."""
    if getattr(outputs, "start_logits", None) is not None:
        mask = batch.get("context_mask")
        if mask is None:
            mask = batch["attention_mask"]
        return extractive_qa.span_logits(outputs.start_logits, outputs.end_logits, mask)
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise TypeError(f"{type(outputs).__name__} has no logits; use a model with a task head")
    return logits
