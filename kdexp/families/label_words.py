"""A decoder LM answering multiple choice through label words (the DBKD authors' MRC setting).

The prompt (`kdexp.families.multiple_choice.prompts`) ends with ``Answer:``; the model's next-token
logits there, read at the label words `` A``, `` B``, ..., are the option logits ``[B, C]``. So a
GPT-2 teacher or student is, for every method, a model with one logit per option, like an encoder
with a multiple-choice head. Only the last real position goes through the LM head (the vocabulary
projection is the costly part of a GPT-2 step).

A decision-based teacher answers with its top next token. When that token is a label word, the
decision is its option; when it is not (a decoder may prefer another word), the decision is the
label word with the highest logit. Both cases are the argmax over the label words' logits, so
decisions come from the label words only; `off_label_fraction` counts how often the top token was
no label word. The label words' logits are computed in float32, under mixed precision too
(`label_word_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import ModelOutput

from kdexp.errors import ModelError
from kdexp.losses.precision import full_precision

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Decoder families kdexp reads as multiple-choice models through label words.
CAUSAL_LM_TYPES = ("gpt2", "gpt_neo", "gptj", "gpt_neox", "llama", "mistral", "opt", "qwen2", "phi")


def is_causal_lm(config: Any) -> bool:
    return getattr(config, "model_type", None) in CAUSAL_LM_TYPES


@dataclass
class ChoiceOutput(ModelOutput):
    """``logits``: the label words' logits ``[B, C]``; ``next_token_logits``: the whole vocabulary's ``[B, V]``."""

    logits: Tensor | None = None
    next_token_logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


def label_word_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """Each label word's single token id; a word the tokenizer splits is refused in one line."""
    ids = []
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ModelError(
                f"the label word {word!r} is {len(tokens)} tokens for this tokenizer; the option logits "
                "need one token per label word (GPT-2's ' A', ' B', ... are)."
            )
        ids.append(tokens[0])
    return ids


class LabelWordChoiceModel(nn.Module):
    """A causal LM whose output is the next-token logits of the label words at each row's last real token."""

    lm: PreTrainedModel
    word_ids: Tensor  # a buffer

    def __init__(self, lm: PreTrainedModel, word_ids: list[int]) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.register_buffer("word_ids", torch.tensor(word_ids, dtype=torch.long), persistent=False)

    @property
    def num_choices(self) -> int:
        return int(self.word_ids.numel())

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        **_: Any,
    ) -> ChoiceOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        base = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )
        last = attention_mask.long().sum(dim=-1).clamp_min(1) - 1  # rows are padded on the right
        final = base.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        head = self.lm.get_output_embeddings()
        next_token = head(final)
        bias = getattr(head, "bias", None)
        words = label_word_logits(
            final, head.weight.index_select(0, self.word_ids), None if bias is None else bias[self.word_ids]
        )
        return ChoiceOutput(
            logits=words,
            next_token_logits=next_token,
            hidden_states=base.hidden_states if output_hidden_states else None,
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        self.lm.save_pretrained(folder, **kwargs)

    def with_lm(self, lm: PreTrainedModel) -> "LabelWordChoiceModel":
        """The same label words on another LM (a student cut from this one)."""
        return LabelWordChoiceModel(lm, self.word_ids.tolist())


@full_precision
def label_word_logits(final: Tensor, word_rows: Tensor, word_bias: Tensor | None) -> Tensor:
    """The label words' logits ``[B, C]`` from the last hidden states and the label words' rows of the output
    layer, in float32 inside autocast too: a decoder's next-token logits share a large negative offset, where
    bf16 steps by 0.25 to 0.5, so close options would tie and their argmax lean to the first option."""
    return nn.functional.linear(final, word_rows, word_bias)


def off_label_fraction(next_token_logits: Tensor, word_ids: Tensor) -> float:
    """The fraction of rows whose top next token is no label word."""
    top = next_token_logits.argmax(dim=-1)
    return float((~torch.isin(top, word_ids.to(top.device))).float().mean())
