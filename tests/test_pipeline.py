"""The whole run on a tiny BERT and tiny GLUE files: teacher stage, cached signals, outputs, reuse."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForSequenceClassification

from kdexp import teacher_stage as teacher_mod
from kdexp.data import DataSource, load_split
from kdexp.report import report
from kdexp.run import ConfigError, method_options, run, warn_if_teacher_at_floor
from kdexp.tasks import get_task
from kdexp.train import CONFIG_DIR
from tests.conftest import tiny_tokenizer


def tiny_cfg(tiny_model_dir: Path, glue_dir: Path, cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"teacher.name_or_path={tiny_model_dir}",
                "teacher.epochs=1",
                "teacher.batch_size=4",
                f"data.glue_dir={glue_dir}",
                "data.batch_size=4",
                "data.max_length=32",
                f"cache_dir={cache}",
                "logger=none",
                "trainer.max_epochs=2",
                "trainer.enable_progress_bar=false",
                "optim.learning_rate=1e-3",
                *overrides,
            ],
        )


def test_vanilla_kd_run_writes_everything_a_report_needs(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "task=sst2", "method=vanilla_kd")
    results = run(cfg, tmp_path / "run")
    for key in (
        "task",
        "method",
        "seed",
        "metrics",
        "teacher_metrics",
        "student_params",
        "teacher_params",
        "train_seconds",
        "train_examples_per_second",
        "teacher_key",
    ):
        assert key in results
    saved = json.loads((tmp_path / "run/results.json").read_text())
    assert saved["metrics"] == results["metrics"]
    assert (tmp_path / "run/config.yaml").exists()
    assert not (tmp_path / "run/checkpoints").exists()  # removed once results.json is written

    # The saved student is the best epoch's: recompute its dev accuracy by hand.
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run/student").eval()
    dev = load_split(get_task("sst2"), "validation", DataSource(glue_dir))
    tok = tiny_tokenizer()
    correct = 0
    for sentence, label in zip(dev["sentence"], dev["label"]):
        with torch.no_grad():
            correct += int(student(**tok(sentence, return_tensors="pt")).logits.argmax(-1).item() == label)
    assert results["metrics"]["val/accuracy"] == pytest.approx(correct / len(dev))
    dev_labels = list(dev["label"])
    most_frequent = max(dev_labels.count(label) for label in set(dev_labels))  # on a tie either count is it
    assert saved["majority_metrics"] == pytest.approx({"val/accuracy": most_frequent / len(dev)})

    rows = list(csv.DictReader(open(tmp_path / "run/metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    best = max(float(r["val/accuracy"]) for r in rows)
    assert results["metrics"]["val/accuracy"] == pytest.approx(best)
    assert results["student_params"] < results["teacher_params"]


def test_a_teacher_no_better_than_the_most_frequent_label_is_named_in_one_line(caplog) -> None:
    floor = {"val/accuracy": 0.348}
    with caplog.at_level("WARNING", logger="kdexp.run"):
        warn_if_teacher_at_floor(get_task("dream"), {"val/accuracy": 0.42}, floor)
        assert not caplog.records
        warn_if_teacher_at_floor(get_task("dream"), {"val/accuracy": 0.315}, floor)
    [record] = caplog.records
    assert "dev accuracy (0.3150) is no better than answering every dev row with its most frequent label (0.3480)" in (
        record.getMessage()
    )


def test_second_run_reuses_teacher_and_cached_logits(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = run(tiny_cfg(tiny_model_dir, glue_dir, cache, "method=vanilla_kd", "seed=1"), tmp_path / "a")

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was fine-tuned or queried again")

    monkeypatch.setattr(teacher_mod, "_finetune_teacher", refuse)
    monkeypatch.setattr(teacher_mod.Teacher, "_compute_logits", refuse)
    second = run(tiny_cfg(tiny_model_dir, glue_dir, cache, "method=vanilla_kd", "seed=2"), tmp_path / "b")
    third = run(tiny_cfg(tiny_model_dir, glue_dir, cache, "method=finetune", "seed=2"), tmp_path / "c")
    assert first["teacher_key"] == second["teacher_key"] == third["teacher_key"]
    assert len([p for p in (cache / "teachers").iterdir() if p.is_dir()]) == 1
    assert first["teacher_metrics"] == third["teacher_metrics"]

    table = report(tmp_path)
    assert "| teacher |" in table and "| finetune |" in table and "| vanilla_kd |" in table


def test_a_changed_teacher_hyperparameter_trains_a_new_teacher(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    a = run(tiny_cfg(tiny_model_dir, glue_dir, cache, "method=finetune", "trainer.max_epochs=1"), tmp_path / "a")
    b = run(
        tiny_cfg(
            tiny_model_dir, glue_dir, cache, "method=finetune", "trainer.max_epochs=1", "teacher.learning_rate=1e-4"
        ),
        tmp_path / "b",
    )
    assert a["teacher_key"] != b["teacher_key"]
    assert len([p for p in (cache / "teachers").iterdir() if p.is_dir()]) == 2


def test_cached_and_live_teacher_give_the_same_soft_labels(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from kdexp.methods.vanilla_kd import VanillaKD
    from kdexp.run import RunContext

    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=vanilla_kd", "trainer.max_epochs=1")
    run(cfg, tmp_path / "a")
    captured = {}
    original = VanillaKD.from_run

    def spy(cls, context: RunContext, options):
        captured["context"] = context
        return original.__func__(cls, context, options)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(VanillaKD, "from_run", classmethod(spy))
        run(
            tiny_cfg(
                tiny_model_dir,
                glue_dir,
                tmp_path / "cache",
                "method=vanilla_kd",
                "method.live_teacher=true",
                "trainer.max_epochs=1",
            ),
            tmp_path / "b",
        )
    context = captured["context"]
    cached = VanillaKD.from_run(context, method_options("vanilla_kd", live_teacher=False))
    live = VanillaKD.from_run(context, method_options("vanilla_kd", live_teacher=True))
    from kdexp.data import make_loader

    batch = next(iter(make_loader(context.data.train, context.data, 5, shuffle=True, seed=3)))
    assert torch.allclose(cached.teacher_logits_for(batch), live.teacher_logits_for(batch), atol=1e-5)


def test_finished_run_is_not_trained_again(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=finetune", "trainer.max_epochs=1")
    first = run(cfg, tmp_path / "run")
    import kdexp.run as run_mod

    monkeypatch.setattr(run_mod, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained again")))
    assert run(cfg, tmp_path / "run")["metrics"] == first["metrics"]


def test_stsb_regression_run(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    results = run(
        tiny_cfg(
            tiny_model_dir, glue_dir, tmp_path / "cache", "task=stsb", "method=vanilla_kd", "trainer.max_epochs=1"
        ),
        tmp_path / "r",
    )
    assert set(results["metrics"]) == {"val/pearson", "val/spearman", "val/combined_score"}


def test_unknown_method_option_is_refused_before_training(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=vanilla_kd", "+method.temprature=3")
    with pytest.raises(ConfigError, match=r"method.temprature is not a config key of method 'vanilla_kd'"):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "results.json").exists()
