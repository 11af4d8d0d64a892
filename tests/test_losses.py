"""The loss toolkit (kdexp.losses): relation (FSP) losses against a brute-force D×D computation,
feature and relation losses at zero for a student that copies its teacher, and named terms."""

from __future__ import annotations

import copy

import torch

from kdexp.losses import Projections, fsp_loss, fsp_matrix, hidden_mse, kd_terms, weighted_sum
from kdexp.model_internals import forward_with_internals
from tests.conftest import tiny_bert_config


def padded(batch: int = 3, length: int = 7, width: int = 5, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    states = [torch.randn(batch, length, width, generator=generator) for _ in range(4)]
    mask = (torch.arange(length)[None, :] < torch.tensor([7, 4, 5])[:, None]).long()
    return states, mask


def fsp_by_hand(first: torch.Tensor, second: torch.Tensor, tokens: int) -> torch.Tensor:
    """G[i, j] = Σ_t first[t, i] · second[t, j] / n, with explicit loops over the D×D entries."""
    width = first.shape[1]
    g = torch.zeros(width, width, dtype=torch.float64)
    for i in range(width):
        for j in range(width):
            g[i, j] = sum(float(first[t, i]) * float(second[t, j]) for t in range(tokens)) / tokens
    return g


def test_fsp_loss_equals_the_brute_force_matrices() -> None:
    (a, b, c, d), mask = padded()
    per_example = []
    for row in range(3):
        n = int(mask[row].sum())
        student = fsp_by_hand(a[row], b[row], n)
        teacher = fsp_by_hand(c[row], d[row], n)
        per_example.append(((student - teacher) ** 2).mean())
        assert torch.allclose(fsp_matrix(a, b, mask)[row].double(), student, atol=1e-5)
    assert abs(float(fsp_loss(a, b, c, d, mask)) - float(torch.stack(per_example).mean())) < 1e-5


def test_padding_does_not_change_the_fsp_loss() -> None:
    (a, b, c, d), mask = padded()
    noisy = [x + 100 * (mask == 0)[..., None] for x in (a, b, c, d)]
    assert abs(float(fsp_loss(*noisy, mask)) - float(fsp_loss(a, b, c, d, mask))) < 1e-4


def test_feature_relation_and_response_terms_vanish_for_a_copy_of_the_teacher() -> None:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=2)).eval()
    student = copy.deepcopy(teacher)
    batch = {"input_ids": torch.randint(5, 40, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    batch["attention_mask"][1, 4:] = 0
    t, s = (forward_with_internals(model, batch, need_attentions=False) for model in (teacher, student))
    mask = batch["attention_mask"]
    assert float(hidden_mse(s.hidden_states[2], t.hidden_states[2], mask)) == 0.0
    assert float(fsp_loss(s.hidden_states[1], s.hidden_states[2], t.hidden_states[1], t.hidden_states[2], mask)) < 1e-6
    terms = kd_terms(s.logits, t.logits, torch.tensor([0, 1, 1]), temperature=2.0, regression=False)
    assert abs(float(terms["kd"])) < 1e-6


def test_projections_map_the_student_width_to_the_teacher_width() -> None:
    projections = Projections(["a", "b"], student_width=4, teacher_width=6)
    assert projections("a", torch.randn(2, 3, 4)).shape == (2, 3, 6)
    assert projections.by_name["a"] is not projections.by_name["b"]
    same = Projections(["a"], 6, 6)
    x = torch.randn(2, 3, 6)
    assert torch.equal(same("a", x), x) and not list(same.parameters())


def test_the_gradient_of_a_weighted_sum_scales_with_each_weight() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    terms = {"first": (x**2).sum(), "second": (3 * x).sum()}
    for w1, w2 in ((1.0, 0.0), (0.5, 2.0), (0.0, 1.0)):
        x.grad = None
        weighted_sum(terms, {"first": torch.tensor(w1), "second": torch.tensor(w2)}).backward(retain_graph=True)
        assert torch.allclose(x.grad, w1 * 2 * x.detach() + w2 * 3)
