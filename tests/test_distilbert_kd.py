"""`distilbert_kd` (DistilBERT's triple loss, Sanh et al. 2019, in the fine-tuning setting) on tiny models.

The cosine term is checked against torch's own ``nn.CosineEmbeddingLoss`` over the real tokens
(as DistilBERT's distiller selects them), pair by pair; the whole loss against CE and T²·KL
written out; then layer maps, gradients, float32 inside bf16 autocast, and, for both `pkd` and
`distilbert_kd`, full runs across model families and the one-line refusal of another tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification

from kdexp.config import OptimConfig
from kdexp.errors import ConfigError, KdexpError
from kdexp.internal.layer_map import LayerPair
from kdexp.losses import hidden_cosine_loss
from kdexp.methods.distilbert_kd import DistilBertKD, distilbert_layer_map
from kdexp.run import compose_config, method_options, resolve_method
from kdexp.tasks import get_task
from kdexp.teacher import TeacherSignals
from tests.conftest import SPECIAL, WORDS
from tests.test_pkd import batch_of, teacher_logits, tiny_pair

TASK = get_task("sst2")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def module(teacher: BertForSequenceClassification, student: BertForSequenceClassification, **options) -> DistilBertKD:
    return DistilBertKD(
        student,
        TASK,
        OptimConfig(learning_rate=1e-3),
        options=method_options("distilbert_kd", **options),
        teacher=TeacherSignals(logits=teacher_logits(), model=teacher),
    )


def test_layer_maps() -> None:
    assert distilbert_layer_map("uniform", 6, 12) == [LayerPair(j, 2 * j + 1) for j in range(6)]
    assert distilbert_layer_map("last", 6, 12) == [LayerPair(5, 11)]  # DistilBERT's own: the last hidden states
    assert distilbert_layer_map([[0, 0], [1, 5]], 2, 6) == [LayerPair(0, 0), LayerPair(1, 5)]
    with pytest.raises(ConfigError, match="method.layer_map"):
        resolve_method(compose_config(["method=distilbert_kd", "method.layer_map=skip"]).method)
    cfg = compose_config(["method=distilbert_kd", "method.layer_map=[[0,9]]"])
    cls, _ = resolve_method(cfg.method)
    with pytest.raises(ConfigError, match=r"method\.layer_map: .*teacher layer 9 is out of range") as err:
        cls.check_config(cfg, TASK)  # MiniLM-L6 has 6 layers: refused before the teacher stage
    assert "\n" not in str(err.value)


def reference_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's distiller: masked_select the real tokens, then CosineEmbeddingLoss with target 1."""
    keep = mask.bool().unsqueeze(-1).expand_as(student_hidden)
    s = torch.masked_select(student_hidden, keep).view(-1, student_hidden.shape[-1])
    t = torch.masked_select(teacher_hidden, keep).view(-1, teacher_hidden.shape[-1])
    return nn.CosineEmbeddingLoss(reduction="mean")(s, t, s.new_ones(s.shape[0]))


@pytest.mark.parametrize("layer_map,pairs", [("uniform", [(0, 1), (1, 3), (2, 5)]), ("last", [(2, 5)])])
def test_the_loss_is_ce_kd_and_the_mean_cosine_over_pairs(layer_map: str, pairs: list[tuple[int, int]]) -> None:
    teacher, student = tiny_pair()  # widths 16 -> 32: a learned projection per pair
    kd = module(teacher, student, layer_map=layer_map)
    assert [(p.student, p.teacher) for p in kd.layer_pairs] == pairs
    batch = batch_of()
    assert (batch["attention_mask"] == 0).any()  # padded positions, excluded from the cosine
    loss, terms = kd.training_loss(batch)
    with torch.no_grad():
        s_out = student(**{k: batch[k] for k in INPUTS}, output_hidden_states=True)
        t_hidden = teacher(**{k: batch[k] for k in INPUTS}, output_hidden_states=True).hidden_states
        cosines = []
        for j, m in pairs:
            projected = kd.projections.by_name[f"s{j}_t{m}"](s_out.hidden_states[j + 1])
            cosines.append(reference_cosine(projected, t_hidden[m + 1], batch["attention_mask"]))
            torch.testing.assert_close(terms[f"cos/s{j}_t{m}"], cosines[-1])
    t = 2.0
    p_teacher = F.softmax(teacher_logits() / t, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(s_out.logits / t, dim=-1))).sum(-1).mean()
    ce = F.cross_entropy(s_out.logits, batch["labels"])
    expected = 2.0 * ce + 5.0 * t * t * kl + 1.0 * torch.stack(cosines).mean()
    torch.testing.assert_close(loss, expected)


def test_padding_does_not_reach_the_cosine() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    value = hidden_cosine_loss(student, teacher, mask)
    student[mask == 0] = torch.randn(int((mask == 0).sum()), 8, generator=generator)
    torch.testing.assert_close(hidden_cosine_loss(student, teacher, mask), value)
    torch.testing.assert_close(hidden_cosine_loss(teacher, teacher, mask), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_hidden_cosine_loss_is_full_precision_inside_bf16_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 16, 384, generator=generator)
    student = teacher + 1e-3 * torch.randn(teacher.shape, generator=generator)  # near: 1 - cos is small
    mask = torch.ones(4, 16)
    full = hidden_cosine_loss(student, teacher, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = hidden_cosine_loss(student, teacher, mask)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full)


def test_gradients_reach_student_and_projections_never_the_teacher() -> None:
    teacher, student = tiny_pair()
    kd = module(teacher, student)
    loss, _ = kd.training_loss(batch_of())
    loss.backward()
    assert all(p.grad is not None for p in kd.projections.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(name.startswith("teacher") for name in kd.state_dict())


def test_without_the_cosine_term_the_teacher_does_not_run() -> None:
    teacher, student = tiny_pair()
    kd = module(teacher, student, cos_weight=0.0)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    terms = kd.loss_terms(batch_of())
    assert set(terms) == {"ce", "kd"} and calls == []
    assert set(kd.loss_weights()) == {"ce", "kd"}


# --------------------------------------------------------------------------- through the pipeline


def test_pkd_and_distilbert_kd_distil_a_distilbert_student_from_a_roberta_teacher(tmp_path: Path) -> None:
    """Other families (the student's config names its sizes n_layers/dim): both methods run; a student
    with another vocabulary is refused in one line, before training."""
    from kdexp.preflight import EMBEDDED_GLUE
    from kdexp.run import run
    from kdexp.tiny_models import save_tiny_model

    vocabulary = [*SPECIAL, *WORDS]
    teacher = save_tiny_model(tmp_path / "roberta", "roberta", vocabulary)  # 4 layers, width 32
    same = save_tiny_model(tmp_path / "distilbert", "distilbert", vocabulary, num_layers=2, hidden_size=16)
    other = save_tiny_model(tmp_path / "distilbert-other", "distilbert", [*SPECIAL, *reversed(WORDS)], num_layers=2)

    def config(method: str, student: Path) -> object:
        return compose_config(
            [
                f"method={method}",
                "task=sst2",
                "data.source=local",
                f"data.glue_dir={EMBEDDED_GLUE}",
                "data.max_train_samples=24",
                "data.max_eval_samples=8",
                "data.max_length=32",
                "data.batch_size=8",
                f"cache_dir={tmp_path / 'cache'}",
                "logger=none",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                f"teacher.name_or_path={teacher}",
                "teacher.finetuned=true",
                "student=pretrained",
                f"student.name_or_path={student}",
            ]
        )

    for method, pairs in (("pkd", [[0, 1]]), ("distilbert_kd", [[0, 1], [1, 3]])):
        results = run(config(method, same), tmp_path / f"same-{method}")
        assert results["method_info"]["layer_pairs"] == pairs
        assert all(torch.isfinite(torch.tensor(v)) for v in results["metrics"].values())
        with pytest.raises(KdexpError, match="the student must use the teacher's tokenizer") as err:
            run(config(method, other), tmp_path / f"other-{method}")
        assert "\n" not in str(err.value)
        assert not (tmp_path / f"other-{method}" / "student").exists()
        assert not (tmp_path / f"other-{method}" / "checkpoints").exists()
