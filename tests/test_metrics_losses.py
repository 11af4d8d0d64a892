"""GLUE metrics against scikit-learn / SciPy, and the KD losses against their direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdexp.losses import hinton_weights, kd_terms, soft_label_kd, soft_target_kd, weighted_sum
from kdexp.metrics import GlueMetrics, MatthewsCorrelation, majority_metrics
from kdexp.tasks import get_task


def _random_classification(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def _accumulate(task_name: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    metrics = GlueMetrics(get_task(task_name))
    for start in range(0, len(labels), 7):  # several batches, as in validation
        metrics.update(logits[start : start + 7], labels[start : start + 7])
    return metrics.compute()


def test_mrpc_accuracy_f1_and_combined_match_sklearn() -> None:
    logits, labels = _random_classification(53, 2, 0)
    preds = logits.argmax(-1).numpy()
    got = _accumulate("mrpc", logits, labels)
    acc, f1 = accuracy_score(labels, preds), f1_score(labels, preds)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert got["f1"] == pytest.approx(f1, abs=1e-6)
    assert got["combined_score"] == pytest.approx((acc + f1) / 2, abs=1e-6)


def test_cola_matthews_matches_sklearn() -> None:
    logits, labels = _random_classification(61, 2, 1)
    got = _accumulate("cola", logits, labels)
    assert got["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, logits.argmax(-1)), abs=1e-6)


@pytest.mark.parametrize(
    "labels, predictions",
    [
        ([1] * 719 + [0] * 324, [1] * 1043),  # CoLA dev's label counts, "acceptable" everywhere
        ([1, 0, 1], [0, 0, 0]),  # one class predicted
        ([1, 1, 1], [1, 0, 1]),  # one class present
        ([0, 0, 0], [0, 0, 0]),  # both
        ([2, 0, 1, 2, 1], [2, 0, 0, 2, 1]),  # three classes, none degenerate
    ],
)
def test_matthews_correlation_of_degenerate_predictions_is_sklearns(labels: list[int], predictions: list[int]) -> None:
    # sklearn (and the GLUE scripts through it) give 0 wherever the denominator is 0
    metric = MatthewsCorrelation(num_classes=max(labels + predictions + [1]) + 1)
    metric.update(torch.tensor(predictions), torch.tensor(labels))
    assert float(metric.compute()) == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-9)


def test_mnli_three_class_accuracy_matches_sklearn() -> None:
    logits, labels = _random_classification(40, 3, 2)
    got = _accumulate("mnli", logits, labels)
    assert got == {"accuracy": pytest.approx(accuracy_score(labels, logits.argmax(-1)), abs=1e-6)}


class _Splits:
    """The part of kdexp.data.TaskData that majority_metrics reads: eval splits with a `labels` column."""

    def __init__(self, **labels: list[int]) -> None:
        self.eval_splits = tuple(labels)
        self.tokenized = {split: {"labels": values} for split, values in labels.items()}


def test_the_majority_floor_is_the_most_frequent_labels_score_worked_out_by_hand() -> None:
    # MRPC, 7 positive of 10: accuracy 0.7; F1 of "positive" everywhere: precision 0.7, recall 1 -> 1.4 / 1.7
    mrpc = majority_metrics(get_task("mrpc"), _Splits(validation=[1, 1, 0, 1, 1, 0, 1, 0, 1, 1]))
    assert mrpc == pytest.approx(
        {"val/accuracy": 0.7, "val/f1": 1.4 / 1.7, "val/combined_score": (0.7 + 1.4 / 1.7) / 2}
    )
    # SST-2 with more negatives: "negative" everywhere, F1 not a metric of the task
    assert majority_metrics(get_task("sst2"), _Splits(validation=[0, 0, 1])) == pytest.approx({"val/accuracy": 2 / 3})
    # a constant prediction has Matthews correlation 0
    assert majority_metrics(get_task("cola"), _Splits(validation=[1, 0, 1])) == {"val/matthews_correlation": 0.0}
    # a tie goes to the lowest label: "not paraphrase" everywhere, F1 0 (not 2/3)
    assert majority_metrics(get_task("mrpc"), _Splits(validation=[0, 1, 1, 0])) == pytest.approx(
        {"val/accuracy": 0.5, "val/f1": 0.0, "val/combined_score": 0.25}
    )
    # MNLI: each dev split its own majority
    mnli = majority_metrics(
        get_task("mnli"), _Splits(validation_matched=[2, 2, 2, 0], validation_mismatched=[1, 2, 1, 2, 0])
    )
    assert mnli == pytest.approx({"val/accuracy": 0.75, "val_mismatched/accuracy": 0.4})
    # multiple choice: the most frequent answer position
    assert majority_metrics(get_task("dream"), _Splits(validation=[0, 2, 2, 1, 2])) == pytest.approx(
        {"val/accuracy": 0.6}
    )


def test_regression_extractive_qa_and_unlabelled_rows_have_no_majority_floor() -> None:
    assert majority_metrics(get_task("stsb"), _Splits(validation=[1, 2])) is None
    assert majority_metrics(get_task("squad_v2"), _Splits(validation=[0])) is None
    assert majority_metrics(get_task("sst2"), _Splits(validation=[-1, -1])) is None  # unlabelled rows


def test_stsb_pearson_spearman_match_scipy() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.rand(45, generator=g) * 5
    preds = labels + torch.randn(45, generator=g)
    got = _accumulate("stsb", preds.unsqueeze(-1), labels)
    p, s = pearsonr(preds, labels)[0], spearmanr(preds, labels)[0]
    assert got["pearson"] == pytest.approx(p, abs=1e-5)
    assert got["spearman"] == pytest.approx(s, abs=1e-5)
    assert got["combined_score"] == pytest.approx((p + s) / 2, abs=1e-5)


def _kl_by_hand(teacher: np.ndarray, student: np.ndarray, t: float) -> float:
    total = 0.0
    for zt, zs in zip(teacher, student):
        p = np.exp(zt / t) / np.exp(zt / t).sum()
        q = np.exp(zs / t) / np.exp(zs / t).sum()
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(teacher)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_label_kd_is_t_squared_kl(temperature: float) -> None:
    student, _ = _random_classification(9, 3, 4)
    teacher, _ = _random_classification(9, 3, 5)
    expected = temperature**2 * _kl_by_hand(teacher.numpy().astype(float), student.numpy().astype(float), temperature)
    assert float(soft_label_kd(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)
    probs = torch.softmax(teacher / temperature, dim=-1)
    assert float(soft_target_kd(student, probs, temperature)) == pytest.approx(expected, rel=1e-5)


def test_vanilla_kd_mixes_ce_and_kd_with_alpha() -> None:
    student, labels = _random_classification(8, 2, 6)
    teacher, _ = _random_classification(8, 2, 7)
    ce = float(torch.nn.functional.cross_entropy(student, labels))
    kd = 4.0 * _kl_by_hand(teacher.numpy().astype(float), student.numpy().astype(float), 2.0)
    parts = kd_terms(student, teacher, labels, temperature=2.0, regression=False)
    loss = weighted_sum(parts, hinton_weights(0.3))
    assert float(loss) == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)


def test_regression_kd_is_mse_to_the_teacher() -> None:
    student = torch.tensor([[1.0], [2.0], [3.0]])
    teacher = torch.tensor([[1.5], [2.0], [2.0]])
    labels = torch.tensor([1.0, 1.0, 1.0])
    parts = kd_terms(student, teacher, labels, temperature=9.0, regression=True)
    loss = weighted_sum(parts, hinton_weights(0.5))
    mse_teacher = (0.25 + 0 + 1) / 3
    mse_gold = (0 + 1 + 4) / 3
    assert float(parts["kd"]) == pytest.approx(mse_teacher)
    assert float(loss) == pytest.approx(0.5 * mse_gold + 0.5 * mse_teacher)


def test_kd_loss_is_zero_when_student_equals_teacher() -> None:
    z, _ = _random_classification(5, 4, 8)
    assert float(soft_label_kd(z, z.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_weighted_sum_takes_tensor_weights_and_refuses_unknown_terms() -> None:
    terms = {
        "a": torch.tensor(2.0, requires_grad=True),
        "b": torch.tensor(3.0, requires_grad=True),
        "c": torch.tensor(5.0),
    }
    weights = {"a": torch.tensor(0.25), "b": 2.0}  # "c" is only logged
    total = weighted_sum(terms, weights)
    assert float(total) == 0.25 * 2 + 2.0 * 3
    total.backward()
    assert float(terms["a"].grad) == 0.25 and float(terms["b"].grad) == 2.0
    with pytest.raises(KeyError, match="unknown loss terms"):
        weighted_sum(terms, {"d": 1.0})


@pytest.mark.parametrize("kd_form,ce_weight", [("hinton", 0.3), ("additive", 1.0)])
def test_vanilla_kd_forms_weight_ce_as_hinton_or_as_the_dbkd_authors(kd_form: str, ce_weight: float) -> None:

    from transformers import BertForSequenceClassification

    from kdexp.config import OptimConfig
    from kdexp.methods.vanilla_kd import VanillaKD
    from kdexp.run import method_options
    from kdexp.tasks import get_task
    from kdexp.teacher import TeacherSignals
    from tests.conftest import tiny_bert_config, tiny_tokenizer

    torch.manual_seed(0)
    student = BertForSequenceClassification(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    teacher_logits = torch.randn(4, 2)
    module = VanillaKD(
        student,
        get_task("sst2"),
        OptimConfig(),
        teacher=TeacherSignals(logits=teacher_logits),
        options=method_options("vanilla_kd", kd_form=kd_form, alpha=0.7, temperature=2.0),
    )
    batch = {
        **tiny_tokenizer()(["the movie is good", "a bad film"], padding=True, return_tensors="pt"),
        "labels": torch.tensor([1, 0]),
        "idx": torch.tensor([2, 0]),
    }
    loss, _ = module.training_loss(batch)
    logits = module(batch).float()
    ce = float(torch.nn.functional.cross_entropy(logits, batch["labels"]))
    kd = 4.0 * _kl_by_hand(
        teacher_logits[batch["idx"]].numpy().astype(float), logits.detach().numpy().astype(float), 2.0
    )
    assert float(loss) == pytest.approx(ce_weight * ce + 0.7 * kd, rel=1e-5)
