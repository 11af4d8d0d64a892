"""Phase schedules (kdexp.phases) and the base's phase machinery, against hand-counted boundaries."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch

from kdexp.config import OptimConfig
from kdexp.methods.base import DistillationModule
from kdexp.phases import PhaseSchedule, phase_lr_factor
from kdexp.tasks import get_task
from kdexp.training import EpochSeed, ResumePoint
from tests.conftest import tiny_bert_config


def test_step_phases_switch_every_k_steps_forever() -> None:
    schedule = PhaseSchedule.every(3)
    switches = [step for step in range(1, 13) if schedule.end_step(step)]
    assert switches == [3, 6, 9, 12] and schedule.index == 4 and schedule.start_step == 12
    assert not schedule.end_epoch(0)  # a step schedule ignores epoch ends


def test_epoch_phases_with_a_last_phase_for_the_rest_of_training() -> None:
    schedule = PhaseSchedule("epoch", [2, 1, None])
    ends = [schedule.end_epoch(epoch, global_step=10 * (epoch + 1)) for epoch in range(6)]
    assert ends == [False, True, True, False, False, False]
    assert schedule.index == 2 and schedule.is_last and schedule.start_step == 30
    assert schedule.length_in_steps(steps_per_epoch=10, total_steps=60) == 30


def test_per_phase_learning_rate_is_warm_up_then_linear_decay_over_each_phase() -> None:
    schedule = PhaseSchedule.every(10)
    factors = [phase_lr_factor(step, schedule, 0.2, 5, 40) for step in range(10)]
    assert factors[:2] == [0.0, 0.5] and factors[2] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    for step in range(1, 11):
        schedule.end_step(step)
    assert schedule.start_step == 10 and phase_lr_factor(10, schedule, 0.2, 5, 40) == 0.0


def test_state_round_trip_and_refusal_of_another_setup() -> None:
    schedule = PhaseSchedule("step", [4, 4, None])
    for step in range(1, 7):
        schedule.end_step(step)
    copy = PhaseSchedule("step", [4, 4, None])
    copy.load_state_dict(schedule.state_dict())
    assert (
        [copy.end_step(s) for s in range(7, 11)]
        == [schedule.end_step(s) for s in range(7, 11)]
        == [False, True, False, False]
    )
    with pytest.raises(ValueError, match="do not match"):
        PhaseSchedule("step", [5, None]).load_state_dict(schedule.state_dict())


class PhaseRecorder(DistillationModule):
    """Fine-tuning with phases of 2 steps; records (step, phase, learning rate) of every step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        from transformers import BertForSequenceClassification

        super().__init__(
            BertForSequenceClassification(tiny_bert_config(num_layers=1)),
            get_task("sst2"),
            OptimConfig(learning_rate=1e-3, warmup_ratio=0.0),
        )
        self.phases = PhaseSchedule.every(2)
        self.lr_per_phase = True
        self.seen: list[tuple[int, int, float]] = []
        self.started: list[tuple[int, int]] = []

    def loss_terms(self, batch):
        self.seen.append(
            (self.trainer.global_step, self.phases.index, self.trainer.optimizers[0].param_groups[0]["lr"])
        )
        return {"ce": self.task_loss(self(batch), batch["labels"])}

    def on_phase_start(self, index: int) -> None:
        self.started.append((self.trainer.global_step, index))


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(5, 40, (6,), generator=generator),
            "attention_mask": torch.ones(6, dtype=torch.long),
            "labels": torch.tensor(i % 2),
            "idx": torch.tensor(i),
        }
        for i in range(10)
    ]
    # its own generator, as the framework's loaders have: creating an iterator then draws nothing from the
    # global generator, whose state at each epoch start EpochSeed sets
    return torch.utils.data.DataLoader(rows, batch_size=2, generator=torch.Generator().manual_seed(1))


def fit(module: DistillationModule, callbacks=(), ckpt_path=None, epochs: int = 2) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path, weights_only=True)


def test_step_phases_inside_a_fit_switch_every_k_steps_and_restart_the_learning_rate() -> None:
    module = PhaseRecorder()
    fit(module)
    assert [phase for _, phase, _ in module.seen] == [step // 2 for step in range(10)]
    assert module.started == [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5)]
    for step, _, lr in module.seen:  # warm-up 0: full rate at each phase's first step, half at its second
        assert lr == pytest.approx(1e-3 if step % 2 == 0 else 0.5e-3)


def test_a_resumed_run_is_in_the_same_phase(tmp_path) -> None:
    class Killed(Exception):
        pass

    class Stop(pl.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            if trainer.current_epoch == 1:
                raise Killed

    last = tmp_path / "last.ckpt"
    straight = PhaseRecorder()
    fit(straight, [EpochSeed(0)])
    with pytest.raises(Killed):
        fit(PhaseRecorder(), [ResumePoint(last, "x"), EpochSeed(0), Stop()])
    resumed = PhaseRecorder()
    point = ResumePoint(last, "x")
    point.resumed_epoch = 1
    fit(resumed, [point, EpochSeed(0)], ckpt_path=str(last))
    assert resumed.seen == straight.seen[5:]  # steps 5..9: the same phases and learning rates
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_learning_rate_schedulers_against_their_formulas() -> None:
    import math

    from kdexp.config import OptimConfig
    from kdexp.methods.base import lr_schedule

    cosine = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    for name, expected in (
        ("constant", [1.0] * 6),
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3, 0.0]),
        ("cosine", cosine),
    ):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = lr_schedule(optimizer, OptimConfig(learning_rate=1.0, warmup_ratio=0.4, lr_scheduler=name), 5)
        rates = []
        for _ in range(6):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert rates == pytest.approx(expected), name
