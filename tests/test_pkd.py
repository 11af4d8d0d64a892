"""`pkd` (Patient Knowledge Distillation, Sun et al. 2019) on tiny models.

The patient-teacher term is checked against a hand-written loop over examples and matched
layers, the whole loss against CE and T²·KL written out, the layer maps against the paper's
and the authors' indices, cached [CLS] vectors against the live teacher, gradients, float32
inside bf16 autocast, and the refusals before training.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification

from kdexp.config import OptimConfig
from kdexp.errors import ConfigError
from kdexp.internal.layer_map import LayerPair
from kdexp.losses import patience_loss
from kdexp.methods.pkd import PKD, pkd_layer_map
from kdexp.run import compose_config, method_options, resolve_method
from kdexp.tasks import get_task
from kdexp.teacher import TeacherSignals
from tests.conftest import tiny_bert_config

TASK = get_task("sst2")
ROWS, SEQ = 6, 7


def no_dropout(num_layers: int, **sizes) -> BertForSequenceClassification:
    return BertForSequenceClassification(
        tiny_bert_config(num_layers=num_layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **sizes)
    )


def tiny_pair(student_hidden: int = 16) -> tuple[BertForSequenceClassification, BertForSequenceClassification]:
    """A 6-layer teacher (width 32) and a 3-layer student (width 16: a learned projection)."""
    torch.manual_seed(0)
    teacher = no_dropout(6).eval()
    student = no_dropout(3, hidden_size=student_hidden, intermediate_size=32)
    return teacher, student


def batch_of(rows: int = ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (rows, SEQ), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for row in range(rows):
        pad = row % 3
        if pad:
            mask[row, -pad:] = 0
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, 2, (rows,), generator=generator),
        "idx": torch.arange(rows),
    }


def teacher_logits(rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, 2, generator=torch.Generator().manual_seed(1)) * 3


def module(teacher, student, **options) -> PKD:
    signals = TeacherSignals(logits=teacher_logits(), model=teacher)
    return PKD(
        student,
        TASK,
        OptimConfig(learning_rate=1e-3, warmup_ratio=0.0),
        options=method_options("pkd", **options),
        teacher=signals,
    )


# --------------------------------------------------------------------------- the layer maps


def test_pkd_skip_is_the_uniform_map_without_the_last_student_layer() -> None:
    # The authors' fc_layer_idx for BERT-base -> 6 layers is "1,3,5,7,9" (0-based teacher layers).
    assert [p.teacher for p in pkd_layer_map("skip", 6, 12)] == [1, 3, 5, 7, 9]
    assert [p.student for p in pkd_layer_map("skip", 6, 12)] == [0, 1, 2, 3, 4]
    assert pkd_layer_map("skip", 3, 12) == [LayerPair(0, 3), LayerPair(1, 7)]  # the paper's {4, 8}, 1-based
    assert pkd_layer_map("last", 6, 12) == [LayerPair(j, 6 + j) for j in range(5)]  # the paper's {7..11}, 1-based
    assert pkd_layer_map([[0, 4], [2, 5]], 3, 6) == [LayerPair(0, 4), LayerPair(2, 5)]
    with pytest.raises(ValueError, match=r"1-layer student has no layer below its last.*\[\[0, 11\]\]"):
        pkd_layer_map("skip", 1, 12)
    with pytest.raises(ValueError, match="skip, last or a list"):
        pkd_layer_map("uniform", 3, 6)


def test_a_one_layer_student_with_pkd_skip_is_refused_before_the_teacher_stage() -> None:
    cfg = compose_config(["method=pkd", "student.num_layers=1"])
    cls, _ = resolve_method(cfg.method)
    with pytest.raises(ConfigError, match=r"method\.layer_map: a 1-layer student") as err:
        cls.check_config(cfg, TASK)
    assert "\n" not in str(err.value)
    cls.check_config(compose_config(["method=pkd", "student.num_layers=1", "method.layer_map=[[0,5]]"]), TASK)


def test_bad_options_name_their_key() -> None:
    for override, key in (
        ("method.beta=-1", "method.beta"),
        ("method.layer_map=uniform", "method.layer_map"),
        ("method.teacher_cls_cache=sometimes", "method.teacher_cls_cache"),
        ("method.alpha=2", "method.alpha"),
    ):
        with pytest.raises(ConfigError, match=key):
            resolve_method(compose_config(["method=pkd", override]).method)


# --------------------------------------------------------------------------- the loss


def hand_patience(student_hidden, teacher_hidden, pairs, projections, normalize: bool = True) -> torch.Tensor:
    """Σ_b Σ_j ||ŝ − t̂||² / (B·M·D), one example and one layer at a time."""
    total, batch_size = torch.zeros((), dtype=torch.float64), student_hidden[0].shape[0]
    width = teacher_hidden[0].shape[-1]
    for b in range(batch_size):
        for student_layer, teacher_layer in pairs:
            s = projections.by_name[f"s{student_layer}_t{teacher_layer}"](student_hidden[student_layer + 1][b, 0])
            t = teacher_hidden[teacher_layer + 1][b, 0]
            s, t = s.double(), t.double()
            if normalize:
                s, t = s / s.norm(), t / t.norm()
            total = total + ((s - t) ** 2).sum()
    return total / (batch_size * len(pairs) * width)


@pytest.mark.parametrize("normalize", [True, False])
def test_patience_term_equals_a_loop_over_examples_and_layers(normalize: bool) -> None:
    teacher, student = tiny_pair()
    pkd = module(teacher, student, normalize=normalize)
    assert pkd.layer_pairs == (LayerPair(0, 1), LayerPair(1, 3))  # skip: 3 -> 6 without the last pair (2, 5)
    batch = batch_of()
    terms = pkd.loss_terms(batch)
    with torch.no_grad():
        s_hidden = student(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, output_hidden_states=True
        ).hidden_states
        t_hidden = teacher(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, output_hidden_states=True
        ).hidden_states
        expected = hand_patience(s_hidden, t_hidden, [(0, 1), (1, 3)], pkd.projections, normalize)
    torch.testing.assert_close(terms["pt"].double(), expected, rtol=1e-5, atol=1e-8)
    assert float(terms["pt"].detach()) > 0


def test_the_loss_is_the_papers_weighted_sum() -> None:
    teacher, student = tiny_pair()
    pkd = module(teacher, student, temperature=5.0, alpha=0.7, beta=500.0)
    batch = batch_of()
    loss, terms = pkd.training_loss(batch)
    with torch.no_grad():
        logits = student(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    t = 5.0
    p_teacher = F.softmax(teacher_logits() / t, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(logits / t, dim=-1))).sum(-1).mean()
    ce = F.cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["kd"], t * t * kl)
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * t * t * kl + 500.0 * terms["pt"])


def test_patience_loss_is_full_precision_inside_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 5, 384, generator=generator)
    student = teacher + 1e-2 * torch.randn(teacher.shape, generator=generator)  # near: cancellation bites
    full = patience_loss(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = patience_loss(student.bfloat16(), teacher.bfloat16())
        from_float = patience_loss(student, teacher)
    assert mixed.dtype == from_float.dtype == torch.float32
    torch.testing.assert_close(from_float, full)
    with pytest.raises(ValueError, match="project the student first"):
        patience_loss(student[..., :16], teacher)


def test_cached_cls_vectors_give_the_live_teachers_term_without_a_teacher_forward() -> None:
    teacher, student = tiny_pair()
    batch = batch_of()
    layers = [1, 3]
    with torch.no_grad():
        hidden = teacher(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, output_hidden_states=True
        ).hidden_states
    table = torch.stack([hidden[m + 1][:, 0] for m in layers], dim=1)  # [N, M, D_T], rows = idx
    live = module(teacher, student)
    cached = PKD(
        student,
        TASK,
        options=method_options("pkd"),
        teacher_config=teacher.config,
        teacher=TeacherSignals(logits=teacher_logits(), cls=table, cls_layers=layers),
    )
    cached.projections.load_state_dict(live.projections.state_dict())
    shuffled = {k: v[[3, 0, 5, 1]] for k, v in batch.items()}  # rows looked up by idx, not position
    torch.testing.assert_close(cached.teacher_cls(shuffled), live.teacher_cls(shuffled), rtol=1e-5, atol=1e-6)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(cached.loss_terms(shuffled)["pt"], live.loss_terms(shuffled)["pt"])
    assert len(calls) == 1  # the live module's forward only


def test_gradients_reach_student_and_projections_never_the_teacher() -> None:
    teacher, student = tiny_pair()
    pkd = module(teacher, student)
    loss, _ = pkd.training_loss(batch_of())
    loss.backward()
    assert all(p.grad is not None for p in pkd.projections.parameters())
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(name.startswith("teacher") for name in pkd.state_dict())  # never in checkpoints


def test_a_fit_lowers_the_patience_term() -> None:
    import pytorch_lightning as pl

    teacher, student = tiny_pair()
    pkd = module(teacher, student)
    batch = batch_of()
    before = float(pkd.loss_terms(batch)["pt"].detach())
    loader = torch.utils.data.DataLoader([batch] * 20, batch_size=None)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(pkd, train_dataloaders=loader)
    assert float(pkd.loss_terms(batch)["pt"].detach()) < 0.75 * before
