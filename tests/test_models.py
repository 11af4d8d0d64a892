"""Student builders and model-path errors, on a tiny BERT saved by the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdexp.models import ModelError, build_student, resolve_model_path, uniform_layer_indices
from kdexp.tasks import get_task
from transformers import AutoModelForSequenceClassification


def _layer_weight(model, i: int) -> torch.Tensor:
    return model.bert.encoder.layer[i].attention.self.query.weight


def test_first_layers_copies_embeddings_and_the_first_k_layers(tiny_model_dir: Path) -> None:
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    student = build_student(OmegaConf.create({"init": "first_layers", "num_layers": 2}), str(tiny_model_dir), get_task("sst2"))
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for i in range(2):
        assert torch.equal(_layer_weight(student, i), _layer_weight(teacher, i))
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def test_every_nth_layer_takes_uniformly_spaced_layers(tiny_model_dir: Path) -> None:
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    student = build_student(OmegaConf.create({"init": "every_nth_layer", "num_layers": 2}), str(tiny_model_dir), get_task("sst2"))
    assert torch.equal(_layer_weight(student, 0), _layer_weight(teacher, 1))
    assert torch.equal(_layer_weight(student, 1), _layer_weight(teacher, 3))


def test_uniform_layer_indices_closed_form() -> None:
    assert uniform_layer_indices(4, 12) == [2, 5, 8, 11]
    assert uniform_layer_indices(6, 12) == [1, 3, 5, 7, 9, 11]
    assert uniform_layer_indices(3, 6) == [1, 3, 5]
    assert uniform_layer_indices(6, 6) == list(range(6))


def test_student_saved_and_reloaded_gives_the_same_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    student = build_student(OmegaConf.create({"init": "first_layers", "num_layers": 3}), str(tiny_model_dir), get_task("mnli"))
    student.eval()
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    assert again.config.num_labels == 3
    assert torch.allclose(student(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)


def test_k_larger_than_the_teacher_is_refused_with_the_range(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"student.num_layers=5 .* 4 layers: choose 1..4"):
        build_student(OmegaConf.create({"init": "first_layers", "num_layers": 5}), str(tiny_model_dir), get_task("sst2"))


def test_random_student_has_the_configured_sizes(tiny_model_dir: Path) -> None:
    spec = OmegaConf.create({"init": "random", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24})
    student = build_student(spec, str(tiny_model_dir), get_task("stsb"))
    assert (student.config.hidden_size, student.config.num_hidden_layers, student.config.num_labels) == (16, 1, 1)
    bad = OmegaConf.create({"init": "random", "hidden_size": 15, "num_attention_heads": 2})
    with pytest.raises(ModelError, match="not divisible"):
        build_student(bad, str(tiny_model_dir), get_task("sst2"))


def test_unknown_student_init_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="student.init='copy' is unknown"):
        build_student(OmegaConf.create({"init": "copy"}), str(tiny_model_dir), get_task("sst2"))


def test_model_path_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"teacher.name_or_path='\./no/such/model': no model there"):
        resolve_model_path("./no/such/model", "teacher.name_or_path")
    with pytest.raises(ModelError, match="no model there"):
        resolve_model_path(str(tmp_path))  # a folder without config.json
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"  # Hub ids pass through
