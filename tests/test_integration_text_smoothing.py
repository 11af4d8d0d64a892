"""Text smoothing end to end on the real MiniLM-L6 (with its adapted MLM head) and ../shared/glue_data slices.

Marked `integration` (about two minutes on an idle 2-core machine): `python -m kdexp.train`
runs `text_smoothing_kd` (teacher stage, MLM adaptation stage, MLM distribution store,
cached teacher logits, two optimiser steps per batch), then `text_smoothing` in a second
process, which must reuse the adapted MLM and the stored distributions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import kdexp_train

pytestmark = pytest.mark.integration

SLICE = [
    "task=sst2",
    "data.max_train_samples=96",
    "data.max_eval_samples=64",
    "data.max_length=64",
    "teacher.epochs=1",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "method.mlm.adapt.steps=12",
    "method.mlm.adapt.batch_size=16",
]


def test_text_smoothing_on_minilm_with_adapted_mlm_head(real_env: dict[str, str], tmp_path: Path) -> None:
    cache = Path(real_env["KDEXP_CACHE_DIR"])
    first_dir = tmp_path / "kd"
    log = kdexp_train(real_env, "method=text_smoothing_kd", *SLICE, f"hydra.run.dir={first_dir}", cwd=tmp_path)
    assert log.count("MLM adaptation of") == 1 and "MLM distributions: cached" in log

    results = json.loads((first_dir / "results.json").read_text())
    assert results["method"] == "text_smoothing_kd" and 0.0 <= results["metrics"]["val/accuracy"] <= 1.0
    assert results["epochs_trained"] == 1
    record = json.loads((first_dir / "mlm_teacher.json").read_text())
    assert record["adapted"] and record["top_k"] == 64 and record["distributions"] == "cached"
    assert results["method_info"] == record
    (store,) = [p for p in (cache / "mlm").iterdir() if p.is_dir()]
    info = json.loads((store / "mlm.json").read_text())
    metrics = info["metrics"]
    # MiniLM-L6 ships no MLM head: a fresh head scores ~0 before adaptation; 12 steps already help.
    assert metrics["head_initialisation"] == "fresh" and metrics["train_encoder"] is True
    assert metrics["masked_lm_loss"] < metrics["initial_masked_lm_loss"]
    assert record["adaptation_metrics"] == metrics
    assert (store / "model.safetensors").is_file() and (store / "tokenizer.json").is_file()
    steps = [int(line.split(",")[1]) for line in (first_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [2 * 3]  # 96 rows / batch 32 = 3 batches, two optimiser steps each

    second_dir = tmp_path / "ts"
    log = kdexp_train(real_env, "method=text_smoothing", *SLICE, f"hydra.run.dir={second_dir}", cwd=tmp_path)
    assert "MLM adaptation of" not in log and "Reusing the adapted MLM" in log
    assert "Reusing the MLM top-64 distributions" in log
    assert json.loads((second_dir / "results.json").read_text())["method"] == "text_smoothing"
    assert len(list((cache / "signals" / "mlm_topk").glob("*.pt"))) == 1
