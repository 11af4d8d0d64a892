"""The internal-distillation LightningModule (kdexp.methods.internal) on tiny models.

The losses, layer maps and stage bookkeeping have their own tests (tests/test_internal_*.py);
these check what the module adds: gradients through a real training_step, the stages and
layers used inside a real Lightning fit, resume mid-schedule, the per-stage learning rate,
cached [CLS] vectors, truncated forwards, config refusals, and a full run.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from transformers import BertForSequenceClassification

import kdexp.methods.internal as internal_mod
import kdexp.teacher as teacher_mod
from kdexp.config import OptimConfig
from kdexp.internal import LayerPair
from kdexp.methods.internal import InternalConfigError, InternalDistillation
from kdexp.model_internals import forward_with_internals, truncated_encoder
from kdexp.run import ConfigError, build_context, compose_config, method_options, run
from kdexp.tasks import get_task
from kdexp.teacher import TeacherSignals
from kdexp.training import EpochSeed, ResumePoint
from tests.conftest import make_glue_dir, tiny_bert_config, tiny_tokenizer
from tests.test_pipeline import tiny_cfg

TASK = get_task("sst2")
N_EXAMPLES, BATCH, SEQ = 8, 4, 6
STUDENT_PAIRS = (LayerPair(0, 1), LayerPair(1, 3))  # uniform map, 2-layer student, 4-layer teacher


def tiny_models(
    student_hidden: int = 16, student_heads: int = 2
) -> tuple[BertForSequenceClassification, BertForSequenceClassification]:
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_layers=4))  # hidden 32, 2 heads
    student = BertForSequenceClassification(
        tiny_bert_config(
            num_layers=2, hidden_size=student_hidden, num_attention_heads=student_heads, intermediate_size=32
        )
    )
    return teacher, student


class TinyData(torch.utils.data.Dataset):
    """Fixed random examples with padding (rows end in 0..2 padded positions)."""

    def __init__(self, n: int = N_EXAMPLES, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 40, (n, SEQ), generator=generator)
        self.mask = torch.ones(n, SEQ, dtype=torch.long)
        for i in range(n):
            pad = i % 3
            if pad:
                self.mask[i, -pad:] = 0
        self.ids = self.ids * self.mask
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "token_type_ids": torch.zeros(SEQ, dtype=torch.long),
            "labels": self.labels[i],
            "idx": torch.tensor(i),
        }


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    data = TinyData()
    return (
        torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False),
        torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False),
    )


def teacher_signals(teacher: BertForSequenceClassification) -> TeacherSignals:
    return TeacherSignals(logits=torch.randn(N_EXAMPLES, 2, generator=torch.Generator().manual_seed(1)), model=teacher)


def make_module(algorithm: str = "pid", student_heads: int = 2, **options) -> InternalDistillation:
    """The module with `conf/method/internal_<algorithm>.yaml`'s options, and `options` over them."""
    teacher, _ = tiny_models()
    _, student = tiny_models(student_heads=student_heads)
    options.setdefault("epochs_per_stage", 2)
    return InternalDistillation(
        student,
        TASK,
        OptimConfig(learning_rate=1e-3, warmup_ratio=0.0),
        options=method_options(f"internal_{algorithm}", **options),
        teacher=teacher_signals(teacher),
    )


def one_batch() -> dict[str, torch.Tensor]:
    return next(iter(loaders()[0]))


class Spy:
    """Records, per epoch, the layer pairs each internal loss was computed on, and LR at each step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pairs: dict[int, set[tuple[LayerPair, ...]]] = defaultdict(set)
        self.teacher_depth: dict[int, set[int]] = defaultdict(set)
        self.epoch = -1
        original = internal_mod.internal_terms

        def spy(active_pairs, student_hidden, teacher_hidden, *args, **kwargs):
            self.pairs[self.epoch].add(tuple(active_pairs))
            self.teacher_depth[self.epoch].add(len(teacher_hidden) - 1)
            return original(active_pairs, student_hidden, teacher_hidden, *args, **kwargs)

        monkeypatch.setattr(internal_mod, "internal_terms", spy)
        spy_self = self

        class EpochAndLR(pl.Callback):
            def __init__(self) -> None:
                self.first_lr: dict[int, float] = {}
                self.stage: dict[int, int] = {}

            def on_train_epoch_start(self, trainer, module) -> None:
                spy_self.epoch = trainer.current_epoch
                self.stage[trainer.current_epoch] = module.schedule.current_stage.index

            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                self.first_lr.setdefault(trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"])

        self.callback = EpochAndLR()


def fit(module: InternalDistillation, max_epochs: int, callbacks=(), ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path, weights_only=True)
    return trainer


# ---------------------------------------------------------------------- gradients


@pytest.mark.parametrize("algorithm", ["all", "pid"])
def test_gradients_reach_student_and_projections_never_the_teacher(algorithm: str) -> None:
    module = make_module(algorithm, kd_in_internal_stages=algorithm == "all")
    teacher = module.teacher.model
    assert not any("teacher" in name for name, _ in module.named_parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = module.training_step(one_batch(), 0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    active = module.schedule.active_pairs()
    for pair in active:
        weight = module.projections.by_name[str(pair)].weight  # widths 16 -> 32: a learned Linear
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    layers = module.student.bert.encoder.layer
    deepest = max(p.student for p in active)
    for j, layer in enumerate(layers):
        grad = layer.attention.self.query.weight.grad
        if j <= deepest:
            assert grad is not None and grad.abs().sum() > 0, j
        else:  # pid stage 0: the blocks above the matched layer are not run, and get no gradient
            assert grad is None, j
    classifier_grad = module.student.classifier.weight.grad
    assert (classifier_grad is not None) == (algorithm == "all")  # output KD in the stage only for "all" here


def test_projections_are_checkpointed_and_the_teacher_is_not() -> None:
    module = make_module("sid")
    keys = module.state_dict().keys()
    assert {f"projections.by_name.{p}.weight" for p in STUDENT_PAIRS} <= set(keys)
    assert not any("teacher" in k for k in keys)
    optimised = {id(p) for p in module.parameters() if p.requires_grad}
    assert all(id(p) in optimised for p in module.projections.parameters())


# ---------------------------------------------------------------------- stages in a real fit


EXPECTED = {
    "pid": [{(STUDENT_PAIRS[0],)}] * 2 + [{(STUDENT_PAIRS[1],)}] * 2 + [set()] * 2,
    "sid": [{(STUDENT_PAIRS[0],)}] * 2 + [{STUDENT_PAIRS}] * 2 + [set()] * 2,
    "all": [{STUDENT_PAIRS}] * 2 + [set()] * 4,
}


@pytest.mark.parametrize("algorithm", ["pid", "sid", "all"])
def test_stages_switch_at_the_right_epochs_with_the_right_layers(
    algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    module = make_module(algorithm)
    fit(module, 6, [spy.callback])
    assert [spy.pairs.get(epoch, set()) for epoch in range(6)] == EXPECTED[algorithm]
    stages = [spy.callback.stage[e] for e in range(6)]
    internal = 1 if algorithm == "all" else 2
    assert stages == [s for s in range(internal) for _ in range(2)] + [internal] * (6 - 2 * internal)
    # Truncated teacher forward: only up to the deepest matched teacher layer of the stage.
    for epoch, depths in spy.teacher_depth.items():
        (pairs,) = spy.pairs[epoch]
        assert depths == {max(p.teacher for p in pairs) + 1}
    # Per-stage schedule (warm-up 0): each stage starts at the full rate; within a stage it decays.
    starts = [e for e in range(6) if e == 0 or stages[e] != stages[e - 1]]
    for epoch in range(6):
        if epoch in starts:
            assert spy.callback.first_lr[epoch] == pytest.approx(1e-3)
        else:
            assert spy.callback.first_lr[epoch] < 1e-3


def test_patience_ends_a_stage_early_inside_a_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    # min_delta so large that no epoch counts as an improvement: each stage lasts patience=1 epoch.
    # The first epoch of a stage always improves on "no loss yet", so each stage lasts 2 of its 3 epochs.
    module = make_module("pid", epochs_per_stage=3, patience=1, min_delta=1e9)
    fit(module, 5, [spy.callback])
    assert [spy.pairs.get(e, set()) for e in range(5)] == [
        {(STUDENT_PAIRS[0],)},
        {(STUDENT_PAIRS[0],)},
        {(STUDENT_PAIRS[1],)},
        {(STUDENT_PAIRS[1],)},
        set(),
    ]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [2, 3])
def test_resume_continues_in_the_right_stage(stop_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed as epoch 2 (a stage boundary) or 3 (inside a stage) of pid starts, with 2 epochs per stage.

    The framework's checkpoint is taken as each epoch starts (`ResumePoint`), after the previous
    epoch's stage switch: a resumed run continues in that stage, at that stage's learning rate.
    """

    class StopAt(pl.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            if trainer.current_epoch == stop_at:
                raise Interrupt

    last = tmp_path / "last.ckpt"
    with pytest.raises(Interrupt):
        fit(make_module("pid"), 6, [ResumePoint(last, "run"), EpochSeed(0), StopAt()])
    saved = torch.load(last, weights_only=True)["phases"]
    assert saved["last_epoch"] == stop_at - 1 and saved["index"] == stop_at // 2

    spy = Spy(monkeypatch)
    resume_point = ResumePoint(last, "run")
    resume_point.resumed_epoch = stop_at
    fit(make_module("pid"), 6, [resume_point, EpochSeed(0), spy.callback], ckpt_path=str(last))
    assert sorted(spy.callback.stage) == list(range(stop_at, 6))  # no epoch redone
    assert [spy.pairs.get(e, set()) for e in range(stop_at, 6)] == EXPECTED["pid"][stop_at:]
    if stop_at == 2:  # first epoch of a new stage: the learning rate restarted
        assert spy.callback.first_lr[2] == pytest.approx(1e-3)
    else:
        assert spy.callback.first_lr[3] < 1e-3


def test_final_alpha_weights_the_final_kd_stage_only() -> None:
    module = make_module("all", alpha=0.5, final_alpha=1.0, epochs_per_stage=1)
    internal = module.loss_weights()
    assert internal["ce"] == 0.5 and internal["kd"] == 0.5  # the internal stage keeps alpha
    module.schedule.end_epoch(0)
    assert module.schedule.is_final_kd_stage
    assert module.loss_weights() == {"ce": 0.0, "kd": 1.0}  # soft labels only


def test_a_checkpoint_of_another_method_is_refused() -> None:
    with pytest.raises(ValueError, match="no phase state"):
        make_module().on_load_checkpoint({"state_dict": {}})


# ---------------------------------------------------------------------- config refusals


def test_too_few_max_epochs_is_refused_naming_the_key_and_the_number() -> None:
    def check(method: str, epochs: int) -> None:
        cfg = compose_config(
            [
                f"method={method}",
                "method.epochs_per_stage=2",
                "method.kd_epochs=1",
                "student.num_layers=2",
                f"trainer.max_epochs={epochs}",
            ]
        )
        InternalDistillation.check_config(cfg, TASK)

    with pytest.raises(ConfigError, match=r"trainer\.max_epochs=4 is too small.*= 5 epochs.*trainer\.max_epochs=5"):
        check("internal_pid", 4)
    check("internal_pid", 5)
    check("internal_all", 3)


def test_head_mismatch_is_refused_unless_a_rule_is_given() -> None:
    with pytest.raises(InternalConfigError, match="method.head_mismatch=average"):
        make_module("all", student_heads=4)
    module = make_module("all", student_heads=4, head_mismatch="average")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(module.training_step(one_batch(), 0))


def test_bad_layer_map_names_the_option() -> None:
    with pytest.raises(InternalConfigError, match="method.layer_map"):
        make_module(layer_map=[[0, 1], [2, 3]])
    assert make_module(layer_map=[[0, 0], [1, 2]]).layer_pairs == (LayerPair(0, 0), LayerPair(1, 2))


# ---------------------------------------------------------------------- truncated forwards


def test_truncated_forward_matches_the_first_layers_of_a_full_forward() -> None:
    teacher, _ = tiny_models()
    teacher.eval()
    batch = one_batch()
    with truncated_encoder(teacher, 2):  # the model's first forward: hooks must cover every block
        short = forward_with_internals(teacher, batch, need_attentions=True)
    full = forward_with_internals(teacher, batch, need_attentions=True)
    assert len(short.hidden_states) == 3 and len(short.attentions) == 2
    assert len(full.hidden_states) == 5 and len(full.attentions) == 4 and len(teacher.bert.encoder.layer) == 4
    for a, b in zip(short.hidden_states, full.hidden_states):
        torch.testing.assert_close(a, b)
    for a, b in zip(short.attentions, full.attentions):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------- through the pipeline


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny model, GLUE folder and cache shared by the pipeline tests (the teacher is fine-tuned once)."""
    root = tmp_path_factory.mktemp("internal_pipeline")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(root / "tiny-bert")
    tiny_tokenizer().save_pretrained(root / "tiny-bert")
    return root / "tiny-bert", make_glue_dir(root / "glue"), root / "cache"


def test_pipeline_run_with_internal_pid_writes_results(tiny_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg = tiny_cfg(*tiny_setup, "task=sst2", "method=internal_pid", "trainer.max_epochs=3")
    results = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run/results.json").read_text())
    assert saved["method"] == "internal_pid" and saved["epochs_trained"] == 3
    assert "val/accuracy" in saved["metrics"] and results["metrics"] == saved["metrics"]


def test_pipeline_refuses_too_few_epochs_before_training(tiny_setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cfg = tiny_cfg(*tiny_setup, "method=internal_sid", "trainer.max_epochs=2")
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs=2 .* 3 epochs"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cached_cls_vectors_replace_the_teacher_forward(
    tiny_setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(*tiny_setup, "method=internal_all", "method.attention_weight=0")
    context, cls, options = build_context(cfg, tmp_path / "run")
    cached = cls.from_run(context, options)  # teacher_cls_cache: auto -> cached (only [CLS] is needed)
    assert cached.teacher.cached_cls is not None
    assert list((tiny_setup[2] / "signals/teacher_cls").glob("*.pt"))
    live = cls.from_run(context, dataclasses.replace(options, teacher_cls_cache="never"))
    assert live.teacher.cached_cls is None
    live.load_state_dict(cached.state_dict())  # same projections

    from kdexp.data import make_loader

    batch = next(iter(make_loader(context.data.train, context.data, 5, shuffle=True, seed=3)))
    pairs = cached.layer_pairs
    live_out = live.teacher_internals(batch, pairs)
    calls = []
    monkeypatch.setattr(teacher_mod, "forward_with_internals", lambda model, *a, **k: calls.append(model))
    cached_out = cached.teacher_internals(batch, pairs)
    assert calls == []  # no teacher forward
    for pair in pairs:
        torch.testing.assert_close(
            cached_out.hidden_states[pair.teacher + 1][:, 0],
            live_out.hidden_states[pair.teacher + 1][:, 0],
            rtol=1e-5,
            atol=1e-5,
        )
