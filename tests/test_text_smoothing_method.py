"""`text_smoothing` as a kdexp method: its training step, schedules, stages, caches and refusals.

The maths of smoothing (brute-force embeddings, top-k bounds, one-hot special tokens) is
tested in test_smoothing.py and the MLM loading/adaptation core in test_mlm_loading.py;
here: what the method adds on top, on tiny models.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from transformers import BertForMaskedLM, BertForSequenceClassification
from transformers.models.bert import modeling_bert

import kdexp.methods.text_smoothing as ts
import kdexp.smoothing.mlm_teacher as mlm_teacher
from kdexp.methods.finetune import Finetune
from kdexp.methods.text_smoothing import TextSmoothing
from kdexp.model_internals import model_inputs
from kdexp.run import RunContext, build_context, method_options, run
from kdexp.smoothing import MissingMLMHeadError, mlm_token_distributions
from kdexp.smoothing.store import TopKTokenStore, topk_distributions_at
from kdexp.tasks import get_task
from tests.conftest import tiny_bert_config, tiny_tokenizer
from tests.test_pipeline import tiny_cfg

SPECIAL_IDS = tiny_tokenizer().all_special_ids


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def quiet_lightning_notices() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        yield


@pytest.fixture
def tiny_mlm_dir(tmp_path: Path) -> Path:
    """A tiny BertForMaskedLM (a checkpoint with its MLM head) saved with the tiny tokenizer."""
    torch.manual_seed(1)
    path = tmp_path / "tiny-mlm"
    BertForMaskedLM(tiny_bert_config(num_layers=2)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def no_dropout_student(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = tiny_bert_config(num_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def random_batch(seed: int = 0, rows: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 40, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[:, 0] = 2  # [CLS]
    for row in range(rows):  # right padding of varying length, [SEP] before it
        end = length - row
        input_ids[row, end - 1] = 3
        input_ids[row, end:] = 0
        attention_mask[row, end:] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.randint(0, 2, (rows,), generator=generator),
        "idx": torch.arange(rows),
    }


def tiny_mlm(seed: int = 1) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_bert_config(num_layers=2)).eval()


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- the training step


@pytest.mark.parametrize("top_k", [None, 5])
def test_smooth_rate_zero_gives_exactly_the_finetuning_loss_and_gradients(top_k: int | None) -> None:
    """`sum` schedule, through `training_step`: at lam = 0 the loss and gradients are fine-tuning's."""
    task = get_task("sst2")
    batch = random_batch()
    student = no_dropout_student()
    finetune = Finetune(copy.deepcopy(student), task)
    smoothing = TextSmoothing(
        copy.deepcopy(student),
        task,
        special_token_ids=SPECIAL_IDS,
        mlm_model=tiny_mlm(),
        options=method_options("text_smoothing", smooth_rate=0.0, top_k=top_k, schedule="sum"),
    )
    expected = finetune.training_step(batch, 0)
    expected.backward()
    loss = smoothing.training_step(batch, 0)
    loss.backward()
    assert torch.equal(loss, expected)
    expected_grads, grads = gradients(finetune), gradients(smoothing)
    assert expected_grads.keys() == grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-7, msg=name)

    # The smoothed input really differs from the one-hot one at lam > 0 (the test is not vacuous).
    smoothing.options.smooth_rate = 0.5
    one_hot = smoothing.student.get_input_embeddings()(batch["input_ids"])
    assert not torch.allclose(smoothing.smoothed_embeddings(batch), one_hot)


class StepRecorder(pl.Callback):
    """Counts optimiser steps and records the gradient norm each one steps with."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []

    def on_train_start(self, trainer, module) -> None:  # type: ignore[override]
        # A hook on the optimiser itself sees the gradients it stepped with, after any clipping
        # (Lightning's on_before_optimizer_step runs before its own clipping).
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.record(module))

    def record(self, module) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def fit_on_batches(
    module: TextSmoothing, batches: list[dict], clip: float | None = None
) -> tuple[pl.Trainer, StepRecorder]:
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        callbacks=[recorder],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer, recorder


@pytest.mark.parametrize(("schedule", "steps_per_batch"), [("two_steps", 2), ("sum", 1)])
def test_schedules_take_their_number_of_optimiser_steps_and_clip_each(schedule: str, steps_per_batch: int) -> None:
    module = TextSmoothing(
        no_dropout_student(),
        get_task("sst2"),
        special_token_ids=SPECIAL_IDS,
        mlm_model=tiny_mlm(),
        options=method_options("text_smoothing", top_k=4, schedule=schedule),
    )
    module.optim.learning_rate = 1e-2
    batches = [random_batch(seed) for seed in range(3)]
    trainer, recorder = fit_on_batches(module, batches, clip=1e-3)
    assert module.automatic_optimization == (schedule == "sum")
    assert len(recorder.grad_norms) == 3 * steps_per_batch == trainer.global_step
    # The linear schedule steps once per batch in both schedules (it spans the run's batches).
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    # The trainer's gradient_clip_val=1e-3 is applied to every step (by hand in two_steps).
    assert max(recorder.grad_norms) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize(
    ("step_order", "expected"),
    [
        ("original_first", ["original", "smoothed"]),  # the default: the authors' code (caskcsg/TextSmoothing)
        ("smoothed_first", ["smoothed", "original"]),
    ],
)
def test_two_steps_take_the_steps_in_the_configured_order(step_order: str, expected: list[str]) -> None:
    """At lam = 0 both steps of a batch see fine-tuning's loss: the first before any update, the second after it."""
    task = get_task("sst2")
    batch = random_batch()
    student = no_dropout_student()
    options = method_options("text_smoothing", smooth_rate=0.0, top_k=3, schedule="two_steps", step_order=step_order)
    smoothing = TextSmoothing(
        copy.deepcopy(student), task, special_token_ids=SPECIAL_IDS, mlm_model=tiny_mlm(), options=options
    )
    seen: list[tuple[str, float, dict]] = []
    for name in ("smoothed", "original"):
        original = getattr(smoothing, f"{name}_terms")

        def spy(batch, name=name, original=original):
            terms = original(batch)
            seen.append(
                (
                    name,
                    float(terms[f"ce_{name}"].detach()),
                    {k: v.detach().clone() for k, v in smoothing.student.state_dict().items()},
                )
            )
            return terms

        setattr(smoothing, f"{name}_terms", spy)
    fit_on_batches(smoothing, [batch])
    assert [name for name, _, _ in seen] == expected
    finetune = Finetune(copy.deepcopy(student), task)
    for _, loss, state in seen:
        finetune.student.load_state_dict(state)
        assert loss == pytest.approx(float(finetune.training_loss(batch)[0]), abs=1e-6)
    for key, value in student.state_dict().items():  # the first step's loss is the untrained student's
        assert torch.equal(seen[0][2][key], value), key
    assert seen[0][1] != seen[1][1]  # an update happened between the two steps


def test_the_default_step_order_is_the_authors() -> None:
    assert method_options("text_smoothing").step_order == "original_first"
    assert method_options("text_smoothing_kd").step_order == "original_first"


# --------------------------------------------------------------------------- stages and caches


def context_for(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, *overrides: str) -> RunContext:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=text_smoothing", *overrides)
    context, _, _ = build_context(cfg, tmp_path / "run")
    return context


class Counter:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_mlm_distribution_store_is_computed_once_and_matches_live(
    tiny_model_dir: Path, tiny_mlm_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_for(tiny_model_dir, glue_dir, tmp_path)
    common = {"top_k": 6, "mlm.name_or_path": str(tiny_mlm_dir), "mlm.adapt.enabled": False}
    options = method_options("text_smoothing", **common)
    head_forward = Counter(modeling_bert.BertOnlyMLMHead.forward)
    monkeypatch.setattr(modeling_bert.BertOnlyMLMHead, "forward", lambda self, *a, **k: head_forward(self, *a, **k))

    first = TextSmoothing.from_run(context, options)
    assert head_forward.calls > 0 and first.topk_store is not None and not first._mlm
    stored = list((context.data.cache_dir / "signals" / "mlm_topk").glob("*.pt"))
    assert len(stored) == 1
    record = json.loads((tmp_path / "run" / ts.RUN_MLM_FILE).read_text())
    assert record["distributions"] == "cached" and record["adapted"] is False

    head_forward.calls = 0
    second = TextSmoothing.from_run(context, options)
    assert head_forward.calls == 0  # read from the store: no MLM forward
    for name, tensor in first.topk_store.tensors().items():
        assert torch.equal(second.topk_store.tensors()[name], tensor)
    # A different temperature is another store.
    TextSmoothing.from_run(context, method_options("text_smoothing", temperature=2.0, **common))
    assert head_forward.calls > 0 and len(list(stored[0].parent.glob("*.pt"))) == 2

    # The stored (float16) distributions are the live ones, to float16 precision.
    live = TextSmoothing.from_run(context, method_options("text_smoothing", distributions="live", **common))
    assert live.topk_store is None and live._mlm
    from kdexp.data import make_loader

    for batch in make_loader(context.data.train, context.data, 5, shuffle=True, seed=0):
        cached_q, live_q = first.mlm_distributions(batch), live.mlm_distributions(batch)
        real = batch["attention_mask"].bool()
        assert torch.equal(cached_q.token_ids[real], live_q.token_ids[real])
        torch.testing.assert_close(cached_q.probs, live_q.probs, rtol=0, atol=2e-3)
        torch.testing.assert_close(first.smoothed_embeddings(batch), live.smoothed_embeddings(batch), rtol=0, atol=1e-3)


def test_chunked_topk_distributions_equal_those_of_the_full_logits() -> None:
    mlm, batch = tiny_mlm(), random_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        full = mlm_token_distributions(mlm(**model_inputs(batch)).logits[real].unsqueeze(0), 1.5, 4)
    chunked = topk_distributions_at(
        mlm, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], real, 4, 1.5, chunk_size=5
    )
    assert torch.equal(chunked.token_ids, full.token_ids)
    torch.testing.assert_close(chunked.probs, full.probs)


def test_store_refuses_a_batch_tokenised_otherwise() -> None:
    store = TopKTokenStore(
        torch.tensor([0, 3, 5]), torch.ones(5, 2).half() / 2, torch.zeros(5, 2, dtype=torch.int32), 40
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert store.distributions(torch.tensor([0, 1]), mask).probs.shape == (2, 3, 2)
    with pytest.raises(ValueError, match="another tokenisation"):
        store.distributions(torch.tensor([1, 0]), mask)


def test_cache_is_skipped_for_the_dense_form_and_above_the_size_threshold() -> None:
    assert ts.choose_distribution_source("auto", None, 10, 2e9)[0] == "live"
    assert ts.choose_distribution_source("auto", 64, 10_000, 2e9)[0] == "cached"
    source, why = ts.choose_distribution_source("auto", 64, 10_000, 1e6)  # 3.84 MB > 1 MB
    assert source == "live" and "3.8 MB > method.cache_max_bytes (1.0 MB)" in why
    with pytest.raises(ValueError, match="needs method.top_k"):
        ts.choose_distribution_source("cached", None, 10, 2e9)


def test_mlm_adaptation_stage_runs_once_per_key_and_is_reused(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_for(tiny_model_dir, glue_dir, tmp_path)  # tiny_model_dir has no MLM head
    adapt = Counter(mlm_teacher.adapt_mlm_head)
    monkeypatch.setattr(mlm_teacher, "adapt_mlm_head", adapt)
    options = method_options(
        "text_smoothing", top_k=4, distributions="live", **{"mlm.adapt.steps": 3, "mlm.adapt.batch_size": 4}
    )

    first = TextSmoothing.from_run(context, options)
    assert adapt.calls == 1
    stores = [p for p in (context.data.cache_dir / "mlm").iterdir() if p.is_dir()]  # not the lock file
    assert len(stores) == 1 and stores[0].name.startswith("sst2-")
    info = json.loads((stores[0] / ts.MLM_INFO_FILE).read_text())
    assert 0.0 <= info["metrics"]["masked_token_accuracy"] <= 1.0 and info["hyperparameters"]["steps"] == 3
    record = json.loads((tmp_path / "run" / ts.RUN_MLM_FILE).read_text())
    assert record["adapted"] and record["mlm_key"] == info["key"]
    assert record["adaptation_metrics"]["masked_token_accuracy"] == info["metrics"]["masked_token_accuracy"]

    second = TextSmoothing.from_run(context, options)
    assert adapt.calls == 1  # reused
    batch = next(iter(torch.utils.data.DataLoader([random_batch()], batch_size=None)))
    torch.testing.assert_close(first.mlm_distributions(batch).probs, second.mlm_distributions(batch).probs)

    TextSmoothing.from_run(
        context,
        method_options(
            "text_smoothing", top_k=4, distributions="live", **{"mlm.adapt.steps": 4, "mlm.adapt.batch_size": 4}
        ),
    )
    assert adapt.calls == 2 and len([p for p in (context.data.cache_dir / "mlm").iterdir() if p.is_dir()]) == 2


def test_checkpoint_without_mlm_head_and_adaptation_disabled_is_refused_before_training(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kdexp.run as run_mod

    monkeypatch.setattr(run_mod, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "method=text_smoothing",
        "method.mlm.adapt.enabled=false",
        "method.top_k=8",
    )
    with pytest.raises(
        MissingMLMHeadError, match=r"Missing MLM head weights: cls\.predictions.*method\.mlm\.adapt\.enabled=true"
    ):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "r" / "results.json").exists()


def test_unknown_mlm_option_is_a_config_error(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    from kdexp.run import ConfigError

    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=text_smoothing", "+method.mlm.adapt.stepz=3")
    with pytest.raises(ConfigError, match=r"method\.mlm\.adapt\.stepz"):
        run(cfg, tmp_path / "r")


# --------------------------------------------------------------------------- whole runs


def test_text_smoothing_run_writes_results(
    tiny_model_dir: Path, tiny_mlm_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "method=text_smoothing",
        "method.top_k=8",
        f"method.mlm.name_or_path={tiny_mlm_dir}",
    )
    results = run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["method"] == "text_smoothing"
    assert results["metrics"]["val/accuracy"] >= 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["6", "12"]  # 3 batches x 2 optimiser steps per epoch
    record = json.loads((tmp_path / "run" / ts.RUN_MLM_FILE).read_text())
    assert record["distributions"] == "cached" and results["method_info"] == record


def test_stsb_regression_with_smoothing_and_kd(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    """STS-B: smoothing applies unchanged with MSE for CE (and MSE to the teacher's prediction for KD)."""
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "task=stsb",
        "method=text_smoothing_kd",
        "method.top_k=4",
        "method.schedule=sum",
        "method.mlm.adapt.steps=2",
        "trainer.max_epochs=1",
    )
    results = run(cfg, tmp_path / "run")
    assert set(results["metrics"]) == {"val/pearson", "val/spearman", "val/combined_score"}
    assert results["method"] == "text_smoothing_kd"


def test_adaptation_budget_in_passes_is_capped_by_steps_and_keeps_old_keys() -> None:
    from kdexp.smoothing.mlm_teacher import MLMAdaptSettings

    plain = MLMAdaptSettings(steps=300, batch_size=32)
    assert plain.budget_steps(230) == 300 and "passes" not in plain.key_parts(128)
    # 230 texts, 10% held out -> 207 trained on; 10 passes = ceil(2070 / 32) = 65 steps.
    ten = MLMAdaptSettings(steps=300, batch_size=32, passes=10)
    assert ten.budget_steps(230) == 65 and ten.key_parts(128)["passes"] == 10
    assert MLMAdaptSettings(steps=300, batch_size=32, passes=10).budget_steps(10_000) == 300  # the cap
