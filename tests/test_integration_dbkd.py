"""DBKD end to end on the real MiniLM-L6 and ../shared/glue_data slices, through `python -m kdexp.train`.

The query stage (teacher decisions on the original + N-1 EDA copies), the decision cache reused
by a second run of another method (which must not query the teacher: checked in its log), one
`dbkd` run and one baseline run (`decision_hard_aug`, which also tokenises the cached copies).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_GLUE, kdexp_train

pytestmark = pytest.mark.integration

SLICE = [
    "task=sst2",
    "data.max_train_samples=64",
    "data.max_eval_samples=64",
    "data.max_length=64",
    "teacher.epochs=1",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "method.queries.num_queries=4",
]


def test_query_stage_cache_reuse_dbkd_and_a_baseline(real_env: dict[str, str], tmp_path: Path) -> None:
    assert Path("/usr/share/wordnet/index.noun").is_file(), "EDA needs WordNet: apt-get install wordnet-base"
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
            argmax = teacher(
                **tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
            ).logits.argmax(-1)
        assert decisions[row].tolist() == argmax.tolist()

    # A baseline run with the same query settings reuses the decisions: no teacher query.
    log = kdexp_train(real_env, "method=decision_hard_aug", *SLICE, f"hydra.run.dir={second_dir}", cwd=tmp_path)
    assert "Querying the teacher" not in log and "Reusing decision queries" in log
    assert "Fine-tuning teacher" not in log
    results = json.loads((second_dir / "results.json").read_text())
    assert results["method"] == "decision_hard_aug" and results["train_examples"] == 64 * 4
    stats = json.loads((second_dir / "decision_stats.json").read_text())
    assert stats["from_cache"] and stats["extra_examples"] == 64 * 3
