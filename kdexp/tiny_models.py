"""Tiny random encoders of every supported family, with a word-level tokenizer, built offline in seconds.

For `kdexp-check` (a preflight that must not download anything) and the tests; never for results.
A family is BERT, RoBERTa, ELECTRA or DistilBERT: the same word-level vocabulary, each family's
own architecture (its layer layout, attention, first-token representation and MLM head), and the
inputs its real tokenizers give (no segment ids for RoBERTa and DistilBERT).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    BertTokenizer,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    PretrainedConfig,
    RobertaConfig,
)

FAMILIES = ("bert", "roberta", "electra", "distilbert")
DECODERS = ("gpt2",)  # decoder LMs: multiple choice through label words (kdexp.families.label_words)
# Words a decoder's prompt is made of (kdexp.families.multiple_choice.prompt_text), kept whole and cased.
PROMPT_WORDS = ("Context", "Question", "Options", "Answer", ":", ".", *"ABCDEFGH")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Families whose real tokenizers give no segment ids (RoBERTa has one segment embedding, DistilBERT none).
WITHOUT_SEGMENTS = ("roberta", "distilbert")


def vocabulary_of(texts: Iterable[str], size: int = 2000) -> list[str]:
    """The special tokens, then the ``size`` most frequent lower-cased words and punctuation marks."""
    counts = Counter(word for text in texts for word in re.findall(r"\w+|[^\w\s]", text.lower()))
    return [*SPECIAL_TOKENS, *(word for word, _ in counts.most_common(size) if word not in SPECIAL_TOKENS)]


def word_tokenizer(vocabulary: list[str], family: str = "bert") -> Any:
    """A whole-word tokenizer over ``vocabulary`` giving the inputs ``family``'s own tokenizers give (a decoder's:
    cased, no segment ids, with the prompt's words and letters)."""
    check_family(family)
    if family in DECODERS:
        vocabulary = [*vocabulary, *(word for word in PROMPT_WORDS if word not in vocabulary)]
        return BertTokenizer(
            vocab={word: i for i, word in enumerate(vocabulary)},
            do_lower_case=False,
            model_input_names=["input_ids", "attention_mask"],
        )
    names = ["input_ids", "attention_mask"] + ([] if family in WITHOUT_SEGMENTS else ["token_type_ids"])
    return BertTokenizer(vocab={word: i for i, word in enumerate(vocabulary)}, model_input_names=names)


def check_family(family: str) -> None:
    if family not in FAMILIES + DECODERS:
        raise ValueError(f"unknown model family '{family}': use one of {', '.join(FAMILIES + DECODERS)}")


def tiny_config(
    family: str,
    vocab_size: int,
    num_layers: int = 4,
    hidden_size: int = 32,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_length: int = 128,
    num_labels: int = 2,
) -> PretrainedConfig:
    """A small config of ``family`` (pad id 0, as in `word_tokenizer`'s vocabulary)."""
    check_family(family)
    common: dict[str, Any] = {"vocab_size": vocab_size, "num_labels": num_labels, "pad_token_id": 0}
    if family == "distilbert":
        return DistilBertConfig(
            dim=hidden_size,
            n_layers=num_layers,
            n_heads=num_heads,
            hidden_dim=intermediate_size,
            max_position_embeddings=max_length,
            **common,
        )
    sizes: dict[str, Any] = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size,
    }
    if family == "roberta":  # positions start after the padding index
        return RobertaConfig(
            max_position_embeddings=max_length + 2, type_vocab_size=1, bos_token_id=2, eos_token_id=3, **sizes, **common
        )
    if family == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_length,
            vocab_size=vocab_size + len(PROMPT_WORDS),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        config.num_labels = num_labels  # GPT2Config's signature has no num_labels; the base config's setter does
        return config
    if family == "electra":
        return ElectraConfig(embedding_size=hidden_size, max_position_embeddings=max_length, **sizes, **common)
    return BertConfig(max_position_embeddings=max_length, **sizes, **common)


def save_tiny_model(
    folder: Path,
    family: str,
    vocabulary: list[str],
    num_labels: int = 2,
    seed: int = 0,
    head: str = "classifier",
    **sizes: Any,
) -> Path:
    """A random ``family`` model and its tokenizer in ``folder``; ``head``: ``classifier``, ``masked_lm``,
    ``multiple_choice``, ``question_answering``, or ``causal_lm`` (the decoders')."""
    torch.manual_seed(seed)
    config = tiny_config(family, len(vocabulary), num_labels=num_labels, **sizes)
    auto = {
        "classifier": AutoModelForSequenceClassification,
        "masked_lm": AutoModelForMaskedLM,
        "multiple_choice": AutoModelForMultipleChoice,
        "question_answering": AutoModelForQuestionAnswering,
        "causal_lm": AutoModelForCausalLM,
    }[head]
    model = auto.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    word_tokenizer(vocabulary, family).save_pretrained(folder)
    return folder
