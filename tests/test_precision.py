"""Every loss term keeps float32 accuracy inside bf16 autocast (CPU), near convergence too.

Each term is computed on the same float32 inputs with and without `torch.autocast("cpu", bfloat16)`
and must agree within a relative 1e-2. The FSP case is the one that showed the problem: without
`full_precision` its Gram products run in bf16 and lose the small difference between student and
teacher (checked below against the undecorated function).
"""

from __future__ import annotations

import pytest
import torch

from kdexp.decision.surrogate import cross_entropy
from kdexp.internal.layer_map import uniform_layer_map
from kdexp.internal.losses import InternalProjections, internal_terms
from kdexp.losses import attention_kl, cls_cosine_loss, fsp_loss, hidden_mse, soft_label_kd, soft_target_kd, task_loss
from kdexp.losses.logits import regression_kd
from kdexp.losses.relations import fsp_matrix
from kdexp.methods.dbkd import scaled_softmax
from kdexp.smoothing.mlm import masked_token_cross_entropy
from kdexp.smoothing.smoothing import (
    TokenDistributions,
    mlm_token_distributions,
    smooth_token_distributions,
    smoothed_inputs_embeds,
)

TOLERANCE = 1e-2


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def relative_difference(mixed: torch.Tensor, full: torch.Tensor) -> float:
    difference = (mixed.detach().double() - full.detach().double()).abs().max()
    return float(difference / full.detach().double().abs().max().clamp_min(1e-30))


def assert_same_in_autocast(loss, *args, **kwargs) -> None:
    full = loss(*args, **kwargs)
    with bf16_autocast():
        mixed = loss(*args, **kwargs)
    assert mixed.dtype == torch.float32
    assert relative_difference(mixed, full) < TOLERANCE, (loss.__name__, float(mixed), float(full))


def near(reference: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``reference`` plus a small perturbation: a student close to its teacher, where cancellation bites."""
    return reference + scale * torch.randn(reference.shape, generator=generator)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def padding_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()


def test_fsp_near_convergence_keeps_float32_accuracy_and_loses_it_without_full_precision(generator) -> None:
    teacher_a, teacher_b = (torch.randn(8, 128, 384, generator=generator) for _ in range(2))
    student_a, student_b = near(teacher_a, 0.02, generator), near(teacher_b, 0.02, generator)
    mask = padding_mask(8, 128, generator)
    args = (student_a, student_b, teacher_a, teacher_b, mask)
    assert_same_in_autocast(fsp_loss, *args)
    # The same Gram products in bf16 (the function without its decorator): the difference is lost.
    full = fsp_loss(*args)
    with bf16_autocast():
        undecorated = fsp_loss.__wrapped__(*args)
    assert relative_difference(undecorated, full) > TOLERANCE


def test_fsp_matrix_in_autocast(generator) -> None:
    a, b = torch.randn(4, 16, 32, generator=generator), torch.randn(4, 16, 32, generator=generator)
    assert_same_in_autocast(fsp_matrix, a, b, padding_mask(4, 16, generator))


@pytest.mark.parametrize("scale", [3.0, 0.01], ids=["far", "near_convergence"])
def test_logit_losses_in_autocast(generator, scale: float) -> None:
    teacher = 4 * torch.randn(32, 1000, generator=generator)  # many classes: a long softmax
    student = near(teacher, scale, generator)
    labels = torch.randint(0, 1000, (32,), generator=generator)
    assert_same_in_autocast(soft_label_kd, student, teacher, 2.0)
    assert_same_in_autocast(soft_target_kd, student, torch.softmax(teacher, dim=-1), 1.0)
    assert_same_in_autocast(task_loss, student, labels, False)
    assert_same_in_autocast(cross_entropy, student, labels)
    assert_same_in_autocast(masked_token_cross_entropy, student, labels)
    assert_same_in_autocast(scaled_softmax, teacher, 1.0, 2.0)
    targets = torch.randn(32, generator=generator)
    assert_same_in_autocast(regression_kd, near(targets, scale, generator).unsqueeze(1), targets.unsqueeze(1))
    assert_same_in_autocast(task_loss, near(targets, scale, generator).unsqueeze(1), targets, True)


@pytest.mark.parametrize("scale", [1.0, 0.01], ids=["far", "near_convergence"])
def test_feature_losses_in_autocast(generator, scale: float) -> None:
    mask = padding_mask(8, 64, generator)
    teacher_scores = torch.randn(8, 4, 64, 64, generator=generator)
    key_mask = (1 - mask)[:, None, None, :].bool()
    teacher_attention = teacher_scores.masked_fill(key_mask, -1e9).softmax(-1)
    student_attention = near(teacher_scores, scale, generator).masked_fill(key_mask, -1e9).softmax(-1)
    assert_same_in_autocast(attention_kl, student_attention, teacher_attention, mask)
    teacher_hidden = torch.randn(8, 64, 384, generator=generator)
    student_hidden = near(teacher_hidden, scale, generator)
    assert_same_in_autocast(hidden_mse, student_hidden, teacher_hidden, mask)
    assert_same_in_autocast(cls_cosine_loss, student_hidden[:, 0], teacher_hidden[:, 0])


def test_internal_terms_with_a_projection_in_autocast(generator) -> None:
    """The method-level terms (per layer pair, through a learned projection) inside autocast."""
    pairs = uniform_layer_map(2, 4)
    projections = InternalProjections(pairs, 32, 48)
    mask = padding_mask(4, 16, generator)
    teacher_hidden = tuple(torch.randn(4, 16, 48, generator=generator) for _ in range(5))
    student_hidden = tuple(torch.randn(4, 16, 32, generator=generator) for _ in range(3))
    attentions = [torch.randn(4, 2, 16, 16, generator=generator).softmax(-1) for _ in range(4)]
    kinds = ("attention_kl", "cls_cosine", "hidden_mse")

    def terms() -> dict[str, torch.Tensor]:
        return internal_terms(
            pairs, student_hidden, teacher_hidden, mask, projections, attentions[:2], attentions, kinds
        )

    full = terms()
    with bf16_autocast():
        mixed = terms()
    for name in full:
        # The projection runs in bf16 (it is a model layer); the loss on its output does not.
        assert relative_difference(mixed[name], full[name]) < 2e-2, name


def test_text_smoothing_over_a_vocabulary_in_autocast(generator) -> None:
    vocab, hidden = 30522, 64
    logits = torch.randn(2, 16, vocab, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator)
    input_ids = torch.randint(0, vocab, (2, 16), generator=generator)
    keep = torch.zeros(2, 16, dtype=torch.bool)

    def embeddings(top_k: int | None) -> torch.Tensor:
        q = mlm_token_distributions(logits, 1.0, top_k)
        return smoothed_inputs_embeds(smooth_token_distributions(q, input_ids, keep, 0.5), weight)

    for top_k in (None, 64):
        full = embeddings(top_k)
        with bf16_autocast():
            mixed = embeddings(top_k)
        assert relative_difference(mixed, full) < TOLERANCE
    full_q = mlm_token_distributions(logits, 1.0)
    with bf16_autocast():
        mixed_q = mlm_token_distributions(logits, 1.0)
    assert isinstance(mixed_q, TokenDistributions) and mixed_q.probs.dtype == torch.float32
    assert relative_difference(mixed_q.probs, full_q.probs) < TOLERANCE
