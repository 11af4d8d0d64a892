"""Per-pass switching to eager attention and extraction of hidden states / attentions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from transformers import AttentionInterface, BertConfig, BertForSequenceClassification
from transformers.models.bert import modeling_bert

from kdexp.model_internals import (
    PRE_DROPOUT_EAGER,
    attention_implementation,
    eager_attention,
    forward_with_internals,
)

NUM_LAYERS = 3


def tiny_bert(attention_dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        attention_probs_dropout_prob=attention_dropout,
    )
    return BertForSequenceClassification(config)


def padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    input_ids = torch.randint(1, 60, attention_mask.shape, generator=generator) * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.tensor([0, 2, 1]),
        "idx": torch.tensor([10, 11, 12]),
    }


@pytest.fixture
def attention_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count calls of each attention function, keyed by the implementation name in the config."""
    calls: Counter = Counter()

    def counting(name: str, function: Callable) -> Callable:
        def wrapper(module, *args, **kwargs):
            calls[name] += 1
            calls[f"config:{module.config._attn_implementation}"] += 1
            return function(module, *args, **kwargs)

        return wrapper

    mapping = AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "sdpa", counting("sdpa", mapping["sdpa"]))
    monkeypatch.setitem(mapping, PRE_DROPOUT_EAGER, counting(PRE_DROPOUT_EAGER, mapping[PRE_DROPOUT_EAGER]))
    # transformers' own "eager" resolves to the module-level default in modeling_bert.
    monkeypatch.setattr(
        modeling_bert, "eager_attention_forward", counting("eager", modeling_bert.eager_attention_forward)
    )
    return calls


def test_model_defaults_to_sdpa() -> None:
    assert tiny_bert().config._attn_implementation == "sdpa"


def test_attentions_are_probability_rows_with_zero_on_padded_keys() -> None:
    model = tiny_bert().eval()
    batch = padded_batch()
    with torch.no_grad():
        internals = forward_with_internals(model, batch, need_attentions=True)
    assert len(internals.attentions) == NUM_LAYERS
    assert len(internals.hidden_states) == NUM_LAYERS + 1
    key_is_padding = (batch["attention_mask"] == 0)[:, None, None, :]
    for attention in internals.attentions:
        assert attention.shape == (3, 4, 6, 6)
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4, 6), atol=1e-6, rtol=0)
        assert (attention >= 0).all()
        assert (attention.masked_select(key_is_padding) == 0).all()


def test_without_attentions_the_sdpa_path_runs(attention_calls: Counter) -> None:
    model = tiny_bert().eval()
    with torch.no_grad():
        internals = forward_with_internals(model, padded_batch(), need_attentions=False)
    assert internals.attentions is None
    assert len(internals.hidden_states) == NUM_LAYERS + 1
    assert attention_calls == Counter({"sdpa": NUM_LAYERS, "config:sdpa": NUM_LAYERS})


def test_with_attentions_only_the_eager_path_runs_and_sdpa_is_restored(attention_calls: Counter) -> None:
    model = tiny_bert().eval()
    with torch.no_grad():
        forward_with_internals(model, padded_batch(), need_attentions=True)
    assert attention_calls == Counter({PRE_DROPOUT_EAGER: NUM_LAYERS, f"config:{PRE_DROPOUT_EAGER}": NUM_LAYERS})
    assert model.config._attn_implementation == "sdpa"
    attention_calls.clear()
    with torch.no_grad():
        forward_with_internals(model, padded_batch(), need_attentions=False)
    assert attention_calls["sdpa"] == NUM_LAYERS and attention_calls[PRE_DROPOUT_EAGER] == 0


def test_eager_and_sdpa_paths_agree() -> None:
    model = tiny_bert().eval()
    batch = padded_batch()
    with torch.no_grad():
        eager = forward_with_internals(model, batch, need_attentions=True)
        sdpa = forward_with_internals(model, batch, need_attentions=False)
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=0)
    real = batch["attention_mask"].bool()
    for eager_hidden, sdpa_hidden in zip(eager.hidden_states, sdpa.hidden_states):
        torch.testing.assert_close(eager_hidden[real], sdpa_hidden[real], atol=1e-5, rtol=0)


def test_hidden_states_can_be_skipped() -> None:
    model = tiny_bert().eval()
    with torch.no_grad():
        internals = forward_with_internals(model, padded_batch(), need_attentions=False, need_hidden_states=False)
    assert internals.hidden_states is None and internals.attentions is None
    assert internals.logits.shape == (3, 3)


def test_training_mode_returns_pre_dropout_probabilities_with_eager_dropout() -> None:
    model = tiny_bert(attention_dropout=0.5).train()
    batch = padded_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    torch.manual_seed(1)
    ours = forward_with_internals(model, batch, need_attentions=True)
    torch.manual_seed(1)
    with attention_implementation(model, "eager"):
        theirs = model(**inputs, output_attentions=True)

    # Same dropout draws on the weights applied to the values -> the same forward.
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-6, rtol=0)
    # transformers' eager returns post-dropout weights, which are not probability rows.
    assert not torch.allclose(theirs.attentions[0].sum(-1), torch.ones(3, 4, 6), atol=1e-3)
    for attention in ours.attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4, 6), atol=1e-6, rtol=0)


def test_implementation_is_restored_after_an_exception() -> None:
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="boom"):
        with eager_attention(model):
            assert model.config._attn_implementation == PRE_DROPOUT_EAGER
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"

    out_of_vocabulary = {"input_ids": torch.full((2, 4), 1000), "attention_mask": torch.ones(2, 4)}
    with pytest.raises(IndexError):
        forward_with_internals(model, out_of_vocabulary, need_attentions=True)
    assert model.config._attn_implementation == "sdpa"


def test_nested_switches_restore_in_order() -> None:
    model = tiny_bert()
    model.set_attn_implementation("eager")
    with attention_implementation(model, "sdpa"):
        with eager_attention(model):
            assert model.config._attn_implementation == PRE_DROPOUT_EAGER
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "eager"


def test_teacher_and_student_switch_independently() -> None:
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=1)
    with eager_attention(teacher):
        assert student.config._attn_implementation == "sdpa"
