"""Losses of distillation from internal representations (Aguilar et al., 2020)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdexp.internal.layer_map import LayerPair, uniform_layer_map
from kdexp.internal.losses import InternalProjections, internal_terms, internal_weights
from kdexp.losses import attention_kl, cls_cosine_loss, hidden_mse, layer_output, weighted_sum
from kdexp.model_internals import forward_with_internals

VOCAB_SIZE = 60


def tiny_bert(layers: int, hidden: int, heads: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 5])
    seq_len = 7
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB_SIZE, (len(lengths), seq_len), generator=generator) * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.tensor([0, 1, 1]),
    }


def random_attention(batch: int, heads: int, seq_len: int, attention_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Softmax rows over real keys only (padded keys get probability exactly 0)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq_len, seq_len, generator=generator) * 2
    key_is_padding = attention_mask[:, None, None, :] == 0
    return scores.masked_fill(key_is_padding, float("-inf")).softmax(dim=-1)


def brute_force_attention_kl(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> float:
    total, real_queries = 0.0, 0
    batch, heads, seq_len, _ = teacher.shape
    for b in range(batch):
        for q in range(seq_len):
            if attention_mask[b, q] == 0:
                continue
            head_kls = []
            for h in range(heads):
                kl = 0.0
                for k in range(seq_len):
                    p, s = teacher[b, h, q, k].item(), student[b, h, q, k].item()
                    if p > 0:
                        kl += p * (math.log(p) - math.log(s))
                head_kls.append(kl)
            total += sum(head_kls) / heads
            real_queries += 1
    return total / real_queries


MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])


def test_attention_kl_matches_brute_force_loop() -> None:
    student = random_attention(3, 4, 6, MASK, seed=1)
    teacher = random_attention(3, 4, 6, MASK, seed=2)
    expected = brute_force_attention_kl(student.double(), teacher.double(), MASK)
    assert attention_kl(student, teacher, MASK).item() == pytest.approx(expected, rel=1e-5)


def test_attention_kl_summed_over_heads_is_the_head_count_times_the_mean() -> None:
    student = random_attention(3, 4, 6, MASK, seed=1)
    teacher = random_attention(3, 4, 6, MASK, seed=2)
    expected = 4 * brute_force_attention_kl(student.double(), teacher.double(), MASK)
    assert attention_kl(student, teacher, MASK, heads="sum").item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="heads must be one of"):
        attention_kl(student, teacher, MASK, heads="max")


def test_attention_kl_ignores_padded_query_rows() -> None:
    student = random_attention(3, 4, 6, MASK, seed=1)
    teacher = random_attention(3, 4, 6, MASK, seed=2)
    before = attention_kl(student, teacher, MASK)
    changed = student.clone()
    replacement = random_attention(3, 4, 6, torch.ones_like(MASK), seed=3)
    query_is_padding = (MASK == 0)[:, None, :, None].expand_as(changed)
    changed[query_is_padding] = replacement[query_is_padding]
    assert not torch.equal(changed, student)
    assert torch.equal(attention_kl(changed, teacher, MASK), before)


def test_attention_kl_head_mismatch_rules() -> None:
    student = random_attention(3, 2, 6, MASK, seed=1)
    teacher = random_attention(3, 4, 6, MASK, seed=2)
    with pytest.raises(ValueError, match="2 attention heads and teacher has 4"):
        attention_kl(student, teacher, MASK)
    with pytest.raises(ValueError, match="2 attention heads and teacher has 4"):
        attention_kl(student, teacher, MASK, head_mismatch="error")
    averaged = attention_kl(student, teacher, MASK, head_mismatch="average")
    expected = brute_force_attention_kl(
        student.double().mean(1, keepdim=True), teacher.double().mean(1, keepdim=True), MASK
    )
    assert averaged.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="head_mismatch must be one of"):
        attention_kl(student, teacher, MASK, head_mismatch="first")  # type: ignore[arg-type]


def test_attention_kl_of_identical_maps_is_zero_and_finite() -> None:
    attention = random_attention(3, 4, 6, MASK, seed=5)
    value = attention_kl(attention, attention.clone(), MASK)
    assert torch.isfinite(value)
    assert value.abs().item() < 1e-6


def test_cls_cosine_loss_matches_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    expected = (
        sum(
            1 - torch.dot(teacher[b], student[b]).item() / (teacher[b].norm().item() * student[b].norm().item())
            for b in range(4)
        )
        / 4
    )
    assert cls_cosine_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="project the student first"):
        cls_cosine_loss(torch.randn(4, 6), teacher)


def test_hidden_mse_counts_real_tokens_only() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 6, 5, generator=generator), torch.randn(3, 6, 5, generator=generator)
    squared_errors = [
        (student[b, t, d] - teacher[b, t, d]).item() ** 2
        for b in range(3)
        for t in range(6)
        if MASK[b, t] == 1
        for d in range(5)
    ]
    expected = sum(squared_errors) / len(squared_errors)
    assert hidden_mse(student, teacher, MASK).item() == pytest.approx(expected, rel=1e-5)
    student_with_noisy_padding = student + 100 * (MASK == 0)[..., None]
    assert hidden_mse(student_with_noisy_padding, teacher, MASK).item() == pytest.approx(expected, rel=1e-5)


def test_projections_are_identity_for_equal_widths_and_linear_otherwise() -> None:
    pairs = [LayerPair(0, 1), LayerPair(1, 3)]
    same_width = InternalProjections(pairs, student_width=8, teacher_width=8)
    assert sum(p.numel() for p in same_width.parameters()) == 0
    hidden = torch.randn(2, 3, 8)
    assert torch.equal(same_width(pairs[0], hidden), hidden)
    wider = InternalProjections(pairs, student_width=8, teacher_width=12)
    assert wider(pairs[1], hidden).shape == (2, 3, 12)
    assert wider.by_name[str(pairs[0])] is not wider.by_name[str(pairs[1])]
    with pytest.raises(KeyError, match="s2_t5"):
        wider(LayerPair(2, 5), hidden)


def test_losses_are_zero_when_student_is_a_copy_of_the_teacher() -> None:
    teacher = tiny_bert(layers=3, hidden=16, heads=4).eval()
    student = copy.deepcopy(teacher).eval()
    batch = padded_batch()
    pairs = uniform_layer_map(3, 3)
    with torch.no_grad():
        teacher_out = forward_with_internals(teacher, batch, need_attentions=True)
        student_out = forward_with_internals(student, batch, need_attentions=True)
        terms = internal_terms(
            pairs,
            student_out.hidden_states,
            teacher_out.hidden_states,
            batch["attention_mask"],
            InternalProjections(pairs, 16, 16),
            student_out.attentions,
            teacher_out.attentions,
            kinds=("attention_kl", "cls_cosine", "hidden_mse"),
        )
    assert set(terms) == {f"{kind}/{pair}" for pair in pairs for kind in ("attention_kl", "cls_cosine", "hidden_mse")}
    for name, value in terms.items():
        assert value.abs().item() < 1e-6, name
    assert weighted_sum(terms, internal_weights(pairs, 1.0, 1.0, 1.0)).abs().item() < 1e-6


def test_internal_loss_uses_layer_j_as_hidden_states_j_plus_1() -> None:
    teacher = tiny_bert(layers=4, hidden=16, heads=4).eval()
    student = tiny_bert(layers=2, hidden=16, heads=4, seed=1).eval()
    batch = padded_batch()
    pairs = uniform_layer_map(2, 4)
    assert pairs == [LayerPair(0, 1), LayerPair(1, 3)]
    projections = InternalProjections(pairs, 16, 16)
    with torch.no_grad():
        teacher_out = forward_with_internals(teacher, batch, need_attentions=True)
        student_out = forward_with_internals(student, batch, need_attentions=True)
        terms = internal_terms(
            pairs,
            student_out.hidden_states,
            teacher_out.hidden_states,
            batch["attention_mask"],
            projections,
            student_out.attentions,
            teacher_out.attentions,
        )
        total = weighted_sum(
            terms, internal_weights(pairs, attention_weight=0.5, cls_weight=2.0, hidden_mse_weight=0.0)
        )
    mask = batch["attention_mask"]
    expected_total = 0.0
    for pair in pairs:
        kl = attention_kl(student_out.attentions[pair.student], teacher_out.attentions[pair.teacher], mask)
        cosine = cls_cosine_loss(
            student_out.hidden_states[pair.student + 1][:, 0], teacher_out.hidden_states[pair.teacher + 1][:, 0]
        )
        assert torch.equal(terms[f"attention_kl/{pair}"], kl)
        assert torch.equal(terms[f"cls_cosine/{pair}"], cosine)
        expected_total += 0.5 * kl.item() + 2.0 * cosine.item()
    assert not any(name.startswith("hidden_mse") for name in terms)
    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    assert torch.equal(layer_output(student_out.hidden_states, 1), student_out.hidden_states[-1])


def test_attentions_are_optional_when_attention_weight_is_zero() -> None:
    pairs = [LayerPair(0, 0)]
    hidden = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    mask = torch.ones(2, 3)
    projections = InternalProjections(pairs, 4, 4)
    terms = internal_terms(pairs, hidden, hidden, mask, projections, kinds=("cls_cosine",))
    assert list(terms) == ["cls_cosine/s0_t0"]
    with pytest.raises(ValueError, match="attentions are missing"):
        internal_terms(pairs, hidden, hidden, mask, projections)


def test_gradients_reach_student_and_projections_but_never_the_teacher() -> None:
    teacher = tiny_bert(layers=4, hidden=16, heads=4).eval()
    teacher.requires_grad_(False)
    student = tiny_bert(layers=2, hidden=8, heads=2, seed=1).train()
    batch = padded_batch()
    pairs = uniform_layer_map(2, 4)
    projections = InternalProjections(pairs, student_width=8, teacher_width=16)
    with torch.no_grad():
        teacher_out = forward_with_internals(teacher, batch, need_attentions=True)
    assert not any(t.requires_grad for t in (*teacher_out.hidden_states, *teacher_out.attentions))
    student_out = forward_with_internals(student, batch, need_attentions=True)
    terms = internal_terms(
        pairs,
        student_out.hidden_states,
        teacher_out.hidden_states,
        batch["attention_mask"],
        projections,
        student_out.attentions,
        teacher_out.attentions,
        kinds=("attention_kl", "cls_cosine", "hidden_mse"),
        head_mismatch="average",
    )
    weighted_sum(terms, internal_weights(pairs, 1.0, 1.0, 1.0)).backward()

    assert all(p.grad is None for p in teacher.parameters())
    for name, parameter in projections.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for layer in student.bert.encoder.layer:
        query_grad = layer.attention.self.query.weight.grad
        assert query_grad is not None and query_grad.abs().sum() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
