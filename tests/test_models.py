"""Student builders and model-path errors, on a tiny BERT saved by the test."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from kdexp.models import ModelError, build_student, model_max_positions, resolve_model_path, uniform_layer_indices
from kdexp.tasks import get_task


def _layer_weight(model, i: int) -> torch.Tensor:
    return model.bert.encoder.layer[i].attention.self.query.weight


def test_first_layers_copies_embeddings_and_the_first_k_layers(tiny_model_dir: Path) -> None:
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    student = build_student(
        OmegaConf.create({"init": "first_layers", "num_layers": 2}), str(tiny_model_dir), get_task("sst2")
    )
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for i in range(2):
        assert torch.equal(_layer_weight(student, i), _layer_weight(teacher, i))
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def test_every_nth_layer_takes_uniformly_spaced_layers(tiny_model_dir: Path) -> None:
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    student = build_student(
        OmegaConf.create({"init": "every_nth_layer", "num_layers": 2}), str(tiny_model_dir), get_task("sst2")
    )
    assert torch.equal(_layer_weight(student, 0), _layer_weight(teacher, 1))
    assert torch.equal(_layer_weight(student, 1), _layer_weight(teacher, 3))


def test_uniform_layer_indices_closed_form() -> None:
    assert uniform_layer_indices(4, 12) == [2, 5, 8, 11]
    assert uniform_layer_indices(6, 12) == [1, 3, 5, 7, 9, 11]
    assert uniform_layer_indices(3, 6) == [1, 3, 5]
    assert uniform_layer_indices(6, 6) == list(range(6))


def test_student_saved_and_reloaded_gives_the_same_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    student = build_student(
        OmegaConf.create({"init": "first_layers", "num_layers": 3}), str(tiny_model_dir), get_task("mnli")
    )
    student.eval()
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    assert again.config.num_labels == 3
    assert torch.allclose(student(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)


def test_k_larger_than_the_teacher_is_refused_with_the_range(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"student.num_layers=5 .* 4 layers: choose 1..4"):
        build_student(
            OmegaConf.create({"init": "first_layers", "num_layers": 5}), str(tiny_model_dir), get_task("sst2")
        )


def test_random_student_has_the_configured_sizes(tiny_model_dir: Path) -> None:
    spec = OmegaConf.create(
        {"init": "random", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24}
    )
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


def test_relative_name_that_can_only_be_a_folder_is_refused_before_the_hub(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    where = re.escape(f"(relative to {tmp_path})")
    with pytest.raises(
        ModelError,
        match=rf"^teacher.name_or_path='outputs/my_teacher': no such folder {where}; give the path of a saved",
    ):
        resolve_model_path("outputs/my_teacher", "teacher.name_or_path")
    with pytest.raises(ModelError, match=r"^student.name_or_path='runs/a/teacher': no such folder"):
        resolve_model_path("runs/a/teacher", "student.name_or_path")
    shutil.copytree(tiny_model_dir, tmp_path / "outputs" / "my_teacher")
    assert resolve_model_path("outputs/my_teacher") == str(tmp_path / "outputs" / "my_teacher")
    assert (
        resolve_model_path("google/bert_uncased_L-2_H-128_A-2") == "google/bert_uncased_L-2_H-128_A-2"
    )  # an org, not a folder


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ("{not json", r"config.json:1: not valid JSON \(.*\); the folder .* needs the config.json"),
        ('{"hidden_size": 32}', r"config.json: has no 'model_type' .*; the folder .* needs the config.json"),
    ],
)
def test_model_folder_with_a_broken_config_names_the_file(
    tiny_model_dir: Path, config_text: str, expected: str
) -> None:
    (tiny_model_dir / "config.json").write_text(config_text)
    with pytest.raises(ModelError, match=re.escape(str(tiny_model_dir)) + "/" + expected):
        resolve_model_path(str(tiny_model_dir), "teacher.name_or_path")
    with pytest.raises(ModelError, match=expected):
        model_max_positions(str(tiny_model_dir))


def test_model_max_positions_from_config_json_without_the_network(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    assert model_max_positions(str(tiny_model_dir)) == 64
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_max_positions("bert-base-uncased") is None  # not cached: unknown, and no download
    snapshot = tmp_path / "hub" / "models--org--tiny-roberta" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    config = {"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    (snapshot / "config.json").write_text(json.dumps(config))
    assert model_max_positions("org/tiny-roberta") == 512  # positions 0..pad_token_id are never used


def test_a_checkpoint_saved_in_bf16_loads_in_float32_unless_the_dtype_key_says_otherwise(tmp_path: Path) -> None:
    """Mixed precision needs float32 master weights: a bf16 checkpoint loads in float32 by default, with
    the values it was saved with; `dtype=bfloat16` keeps bf16."""
    from kdexp.models import load_classifier
    from kdexp.tasks import get_task

    torch.manual_seed(0)
    saved = BertForSequenceClassification(tiny_bert_config()).to(torch.bfloat16)
    saved.save_pretrained(tmp_path / "bf16")
    by_default = load_classifier(str(tmp_path / "bf16"), get_task("sst2"), require_head=True)
    kept = load_classifier(str(tmp_path / "bf16"), get_task("sst2"), require_head=True, dtype="bfloat16")
    assert {p.dtype for p in by_default.parameters()} == {torch.float32}
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    for (name, value), reference in zip(by_default.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(value, reference.float()), name
