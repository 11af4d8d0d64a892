"""Every method's student learns SST-2: real MiniLM-L6, a real ../shared/glue_data slice, a short budget.

Marked `integration`. One teacher (the module's cache) serves eight runs, one per method module:
finetune, vanilla_kd, pkd, distilbert_kd, internal_all, dbkd, text_smoothing and
knowledge_selection, each run in this process by `kdexp.run.run` with the same data, student and
optimiser; a method's own stages (queries, MLM adaptation, agent episodes) are shortened. Each
student's best dev accuracy must beat the majority class of the dev slice and its own untrained
start (the student as built before the first step: the teacher's layers 2 and 5 with a new head,
the same for every method since it depends only on the student config and the seed) by
`MARGIN`. Measured here (2 CPU cores shared with other jobs): the teacher stage (about 25 s on
idle cores) and the eight runs take 3-5 minutes (4-5.5 CPU-minutes); the students reach 0.69-0.75
against a majority of 0.505 and a start of 0.51 (print the summary with `pytest -s`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import SHARED_GLUE

pytestmark = pytest.mark.integration

MARGIN = 0.05  # 10 of the 200 dev rows

SLICE = [
    "task=sst2",
    "data.max_train_samples=400",
    "data.max_eval_samples=200",
    "data.max_length=64",
    "data.batch_size=16",
    "teacher.epochs=2",
    "teacher.batch_size=16",
    "teacher.learning_rate=2e-4",
    # every other teacher layer (MiniLM-L6 layers 2 and 5, PKD's and DistilBERT's student): it learns SST-2
    # in a few dozen steps, where the first two layers (whose [CLS] the sentence model never trained) do not.
    "student=every_nth_layer",
    "student.num_layers=2",
    "optim.learning_rate=5e-4",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "seed=1",
]

METHODS: dict[str, list[str]] = {
    "finetune": [],
    "vanilla_kd": [],
    "pkd": [],
    "distilbert_kd": [],
    "internal_all": ["trainer.max_epochs=2"],  # its two stages: attention KL + [CLS] cosine + KD, then KD alone
    "dbkd": ["method.queries.num_queries=4"],
    "text_smoothing": [
        "method.mlm.adapt.steps=8",
        "method.mlm.adapt.batch_size=16",
        "method.mlm.adapt.train_encoder=false",
    ],
    "knowledge_selection": [
        "method.agent.episodes=2",
        "method.agent.episode_phases=2",
        "method.phase_steps=2",
        "method.reward.rows=32",
    ],
}


def config(cache: Path, method: str) -> Any:
    from kdexp.run import compose_config

    return compose_config(
        [f"method={method}", *SLICE, *METHODS[method], f"data.glue_dir={SHARED_GLUE}", f"cache_dir={cache}"]
    )


def untrained_accuracy_and_majority(cfg: Any, run_dir: Path) -> tuple[float, float]:
    """The dev accuracy of the student as a run builds it, before any step, and the dev slice's majority share."""
    from kdexp.data import make_loader
    from kdexp.metrics import GlueMetrics
    from kdexp.model_internals import model_inputs
    from kdexp.run import build_context

    context, _, _ = build_context(cfg, run_dir)
    data, student = context.data, context.student.eval()
    metrics = GlueMetrics(context.task)
    split = context.task.eval_splits[0]
    with torch.no_grad():
        for batch in make_loader(data.tokenized[split], data, 64, shuffle=False):
            metrics.update(student(**model_inputs(batch, student)).logits, batch["labels"])
    labels = torch.tensor(list(data.raw[split]["label"]))
    majority = float(torch.bincount(labels).max()) / len(labels)
    return metrics.compute()["accuracy"], majority


@pytest.fixture(scope="module")
def trained(real_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The eight runs (sharing the module's cache: one teacher stage), the untrained start and the majority."""
    from kdexp.run import run

    cache, root = Path(real_env["KDEXP_CACHE_DIR"]), tmp_path_factory.mktemp("learn")
    results, seconds = {}, {}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM"):
            patch.setenv(name, real_env[name])
        started, cpu = time.perf_counter(), time.process_time()
        for method in METHODS:
            begun = time.perf_counter()
            results[method] = run(config(cache, method), root / method)
            seconds[method] = round(time.perf_counter() - begun, 1)
        start, majority = untrained_accuracy_and_majority(config(cache, "finetune"), root / "untrained")
        total, cpu = round(time.perf_counter() - started, 1), round(time.process_time() - cpu, 1)
    summary = {
        "seconds": seconds,
        "total_seconds": total,
        "cpu_seconds": cpu,
        "start": start,
        "majority": majority,
        "accuracy": {m: r["metrics"]["val/accuracy"] for m, r in results.items()},
    }
    print(json.dumps(summary, indent=1))  # shown with -s: the measured budget and accuracies
    return {"results": results, "start": start, "majority": majority}


def test_one_teacher_and_one_student_start_serve_every_method(trained: dict[str, Any]) -> None:
    results = trained["results"]
    assert len({r["teacher_key"] for r in results.values()}) == 1
    # The untrained start is a function of the student config and the seed: the same for every method.
    assert len({json.dumps([r["config"]["student"], r["seed"]], sort_keys=True) for r in results.values()}) == 1
    assert 0.3 < trained["majority"] < 0.7  # the dev slice is not one-sided: "beats the majority" means something


@pytest.mark.parametrize("method", list(METHODS))
def test_the_student_beats_the_majority_class_and_its_untrained_start(method: str, trained: dict[str, Any]) -> None:
    accuracy = trained["results"][method]["metrics"]["val/accuracy"]
    assert accuracy > trained["majority"] + MARGIN, (method, accuracy, trained["majority"])
    assert accuracy > trained["start"] + MARGIN, (method, accuracy, trained["start"])
