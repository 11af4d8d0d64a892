"""BERT, RoBERTa, ELECTRA and DistilBERT as teachers and students: tiny random models built here, no download.

What differs by family is read per family (kdexp.model_internals, kdexp.models, kdexp.smoothing.heads):
where the blocks are (layer cutting, truncated forwards), attention maps, the first token's vector, the
inputs a model takes, the MLM head. Each is checked against the model's own full forward; every method
runs on every family (kdexp-check), and a RoBERTa teacher distils a DistilBERT student.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, SPECIAL, WORDS
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from kdexp.errors import KdexpError
from kdexp.model_internals import encoder_layers, forward_with_internals, model_inputs, truncated_encoder
from kdexp.models import select_layers, uniform_layer_indices
from kdexp.smoothing.heads import masked_lm_head
from kdexp.tiny_models import FAMILIES, save_tiny_model

VOCABULARY = [*SPECIAL, *WORDS]


def tiny(tmp_path: Path, family: str, head: str = "classifier", vocabulary: list[str] = VOCABULARY, **sizes) -> Path:
    return save_tiny_model(tmp_path / f"{family}-{head}", family, vocabulary, head=head, **sizes)


def batch_of(folder: Path, pairs: bool = False) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = SENTENCES[:4]
    encoded = (
        tokenizer(texts, texts[::-1], padding=True, return_tensors="pt")
        if pairs
        else tokenizer(texts, padding=True, return_tensors="pt")
    )
    return dict(encoded)


@pytest.mark.parametrize("family", FAMILIES)
def test_cut_layers_are_the_teachers_layers(tmp_path: Path, family: str) -> None:
    """A student of teacher layers (1, 3) computes exactly what the teacher's own layers 1 and 3 compute on
    the output of the layers below them."""
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny(tmp_path, family)).eval()
    indices = uniform_layer_indices(2, 4)
    student = select_layers(teacher, indices).eval()
    assert len(encoder_layers(student)) == 2 and student.config.num_hidden_layers == 2
    for j, i in enumerate(indices):
        for (name, kept), (_, original) in zip(
            encoder_layers(student)[j].state_dict().items(), encoder_layers(teacher)[i].state_dict().items()
        ):
            assert torch.equal(kept, original), (family, name)
    head_keys = [k for k in teacher.state_dict() if "classifier" in k or "pre_classifier" in k]
    assert head_keys and all(torch.equal(teacher.state_dict()[k], student.state_dict()[k]) for k in head_keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_internals_attention_first_token_and_truncation_per_family(tmp_path: Path, family: str) -> None:
    folder = tiny(tmp_path, family)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = batch_of(folder, pairs=True)
    with torch.no_grad():
        full = forward_with_internals(model, batch, need_attentions=True)
        plain = model(**model_inputs(batch, model), output_hidden_states=True)
        with truncated_encoder(model, 2):
            cut = forward_with_internals(model, batch, need_attentions=True)
    assert len(full.hidden_states) == 5 and len(full.attentions) == 4
    mask = batch["attention_mask"].bool()
    for attention in full.attentions:  # probability rows over the real keys, zero on padding
        assert attention.shape == (4, 2, mask.shape[1], mask.shape[1])
        assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5)
        assert float(attention.masked_fill(mask[:, None, None, :], 0.0).abs().max()) < 1e-6
    for eager, sdpa in zip(full.hidden_states, plain.hidden_states):  # eager attention changes nothing
        assert torch.allclose(eager, sdpa, atol=1e-5)
    assert torch.allclose(full.logits, plain.logits, atol=1e-5)
    assert len(cut.hidden_states) == 3 and all(torch.equal(a, b) for a, b in zip(cut.hidden_states, full.hidden_states))
    assert full.hidden_states[-1][:, 0].shape == (4, 32)  # the first token's vector, for every family


@pytest.mark.parametrize("family", FAMILIES)
def test_the_mlm_head_of_each_family_gives_the_models_own_logits(tmp_path: Path, family: str) -> None:
    folder = tiny(tmp_path, family, head="masked_lm")
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    batch = batch_of(folder)
    with torch.no_grad():
        hidden = model.base_model(**model_inputs(batch, model.base_model)).last_hidden_state
        assert torch.allclose(masked_lm_head(model)(hidden), model(**model_inputs(batch, model)).logits, atol=1e-5)


def test_a_model_without_a_known_mlm_head_is_refused_in_one_line() -> None:
    with pytest.raises(KdexpError, match="supports the heads of BERT") as err:
        masked_lm_head(torch.nn.Linear(2, 2))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "bert"])  # BERT: tests/test_preflight.py
def test_every_method_runs_on_every_family(tmp_path: Path, family: str) -> None:
    from kdexp.preflight import main

    out = tmp_path / "check.json"
    code = main(
        [
            "--family",
            family,
            "--precisions",
            "32-true",
            "--steps",
            "2",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ]
    )
    rows = json.loads(out.read_text())
    assert code == 0 and {row["method"] for row in rows} >= {
        "dbkd",
        "internal_pid",
        "knowledge_selection",
        "text_smoothing",
        "vanilla_kd",
    }
    assert all(row["error"] is None and row["finite_loss"] and row["device_ok"] for row in rows), rows


def test_a_roberta_teacher_distils_a_distilbert_student(tmp_path: Path) -> None:
    """Another family as the student (student=pretrained): every input the student does not take (segment ids)
    is left out, layer-wise losses read each family's own layers; with another vocabulary the position-wise
    methods refuse in one line."""
    from kdexp.preflight import EMBEDDED_GLUE
    from kdexp.run import compose_config, run

    teacher = tiny(tmp_path, "roberta")
    same = tiny(tmp_path, "distilbert", num_layers=2)
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
                "trainer.max_epochs=3",
                "trainer.enable_progress_bar=false",
                f"teacher.name_or_path={teacher}",
                "teacher.finetuned=true",
                "student=pretrained",
                f"student.name_or_path={student}",
            ]
        )

    for method in ("vanilla_kd", "internal_all"):
        results = run(config(method, same), tmp_path / f"same-{method}")
        assert all(torch.isfinite(torch.tensor(v)) for v in results["metrics"].values())
        assert results["student_params"] < results["teacher_params"]
    with pytest.raises(KdexpError, match="the student must use the teacher's tokenizer") as err:
        run(config("internal_all", other), tmp_path / "other-internal")
    assert "\n" not in str(err.value)
    assert run(config("vanilla_kd", other), tmp_path / "other-vanilla")["metrics"]
