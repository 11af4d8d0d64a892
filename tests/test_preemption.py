"""Stop signals (kdexp.preemption): SIGTERM, SIGUSR1 or SIGINT stops a run at the next batch boundary with a
step checkpoint, one line and a non-zero exit status; the rerun ends exactly as an uninterrupted run.

`KDEXP_FAULT_ACTION=signal:TERM` makes a `kdexp-train` subprocess send itself the signal at a fault point
(kdexp.faults), as a scheduler pre-empting it would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdexp import preemption
from kdexp.preemption import CheckpointClock, CheckpointEvery, Preempted
from tests.test_reproducibility import assert_same_run, assert_same_weights, finished, tiny_args, train
from tests.test_step_checkpoints import (
    RUN,
    adapt,
    assert_same_adaptation,
    one_thread,
    stored_teacher,
    straight,
    tiny_encoder,
)

# Fixtures shared with test_step_checkpoints: `straight` is one uninterrupted run for both modules (session).
__all__ = ["one_thread", "straight"]


def signalled(args: list[str], cwd: Path, fault: str, name: str = "TERM") -> subprocess.CompletedProcess:
    os.environ["KDEXP_FAULT_ACTION"] = f"signal:{name}"  # train() passes the environment on
    try:
        return train(args, cwd, fault=fault)
    finally:
        del os.environ["KDEXP_FAULT_ACTION"]


def stop_line(proc: subprocess.CompletedProcess, status: int = 143) -> str:
    """The one line a stopped run prints; the exit status checked, and no traceback."""
    log = proc.stdout + proc.stderr
    assert proc.returncode == status, log[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdexp-train:")]
    assert len(lines) == 1, log[-5000:]
    assert "Traceback" not in log
    return lines[0]


def test_sigterm_mid_epoch_saves_a_step_checkpoint_exits_143_and_the_rerun_is_the_uninterrupted_run(
    straight: dict[str, Path], tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    args = tiny_args(straight["model"], straight["glue"], straight["cache"], resumed, *RUN)
    # SIGTERM as batch 0 of epoch 1 starts: that batch finishes, and the run stops as batch 1 starts.
    line = stop_line(signalled(args, tmp_path, fault="train_batch:epoch=1:batch=0"))
    checkpoint = resumed / "checkpoints" / "last.ckpt"
    assert line == (
        f"kdexp-train: stopped by SIGTERM: saved a step checkpoint at epoch 1, batch 1 (global step 4) "
        f"in {checkpoint}; rerun the same command to resume (exit status 143)."
    )
    assert not (resumed / "results.json").exists()

    proc = train(args, tmp_path)
    finished(proc)
    assert f"Resuming from {checkpoint} in epoch 1 at batch 1 (global step 4)" in proc.stdout + proc.stderr
    assert_same_run(straight["run"], resumed)


def fake_scontrol(folder: Path) -> tuple[Path, Path]:
    """An `scontrol` that records its arguments, as SLURM's would receive them: (its folder, its record)."""
    folder.mkdir()
    record = folder / "calls.txt"
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    script.chmod(0o755)
    return folder, record


def test_sigusr1_under_slurm_saves_requeues_the_job_and_the_requeued_run_is_the_uninterrupted_run(
    straight: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What sbatch sets for a one-task job (`#SBATCH --signal=USR1@120`); the requeued job sees the same.
    bin_dir, calls = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "kdexp-sst2"}.items():
        monkeypatch.setenv(name, value)
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        monkeypatch.setenv(name, "0")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    requeued = tmp_path / "requeued"
    args = tiny_args(straight["model"], straight["glue"], straight["cache"], requeued, *RUN)
    line = stop_line(signalled(args, tmp_path, fault="train_batch:epoch=1:batch=0", name="USR1"), status=138)
    checkpoint = requeued / "checkpoints" / "last.ckpt"
    assert line == (
        f"kdexp-train: stopped by SIGUSR1: saved a step checkpoint at epoch 1, batch 1 (global step 4) "
        f"in {checkpoint}; rerun the same command to resume; SLURM job 4242 requeued (exit status 138)."
    )
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert not list(requeued.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own SLURM handler stayed off

    proc = train(args, tmp_path)  # the requeued job: the same command in the same environment
    finished(proc)
    assert f"Resuming from {checkpoint} in epoch 1 at batch 1 (global step 4)" in proc.stdout + proc.stderr
    assert calls.read_text().splitlines() == ["requeue 4242"]  # a run that ends is not requeued
    assert_same_run(straight["run"], requeued)


def test_an_array_task_is_requeued_by_its_array_id_and_a_refusal_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir, calls = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "kdexp-sst2")
    assert preemption.requeue_slurm_job() == "4242_7"
    assert calls.read_text().splitlines() == ["requeue 4242_7"]

    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Requested operation not supported' >&2\nexit 1\n")
    assert preemption.requeue_slurm_job() is None
    assert "scontrol requeue 4242_7 failed (1): Requested operation not supported" in caplog.text

    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # an salloc shell: not a batch job, nothing to requeue
    assert preemption.requeue_slurm_job() is None


def test_sigterm_during_the_teacher_stage_resumes_the_teacher_from_its_step(
    straight: dict[str, Path], tmp_path: Path
) -> None:
    cache, folder = tmp_path / "cache", tmp_path / "run"
    args = tiny_args(straight["model"], straight["glue"], cache, folder, *RUN)
    line = stop_line(signalled(args, tmp_path, fault="teacher_train_batch:epoch=1:batch=0"))
    [partial] = [p for p in (cache / "teachers").iterdir() if p.name.endswith(".partial")]
    checkpoint = partial / "checkpoints" / "last.ckpt"
    assert f"saved a step checkpoint at epoch 1, batch 1 (global step 4) in {checkpoint}" in line
    assert not (folder / "results.json").exists()

    proc = train(args, tmp_path)
    finished(proc)
    assert f"Resuming from {checkpoint} in epoch 1 at batch 1 (global step 4)" in proc.stdout + proc.stderr
    teacher, reference = stored_teacher(cache), stored_teacher(straight["cache"])
    assert teacher.name == reference.name  # the same key
    info, reference_info = (json.loads((p / "teacher.json").read_text()) for p in (teacher, reference))
    assert info["weights_sha256"] == reference_info["weights_sha256"]
    assert info["dev_metrics_at_training"] == reference_info["dev_metrics_at_training"]
    assert info["resumed_from_epoch"] == 1
    assert_same_weights(teacher / "model", reference / "model")
    assert_same_run(straight["run"], folder)


# --------------------------------------------------------------------------- the handlers, in this process


@pytest.fixture
def handlers() -> Iterator[None]:
    """kdexp's handlers installed in this (pytest's) process for one test, then the previous ones back."""
    previous = {signum: signal.getsignal(signum) for signum in preemption.STOP_SIGNALS}
    saved_state, preemption._state = preemption._state, preemption._StopState()
    try:
        assert preemption.install()
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        preemption._state = saved_state


def test_a_signal_outside_a_deferring_stage_stops_at_once(handlers: None) -> None:
    with pytest.raises(Preempted) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_status == 143
    assert stopped.value.saved is None


def test_inside_a_deferring_stage_a_signal_waits_for_its_boundary(handlers: None) -> None:
    with pytest.raises(Preempted) as stopped:
        with preemption.deferring():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert preemption.stop_requested() == signal.SIGUSR1  # recorded; the stage goes on to its boundary
    assert stopped.value.exit_status == 138  # the block ended with the signal pending


def test_deferring_installs_handlers_for_its_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preemption, "_state", preemption._StopState())
    before = signal.getsignal(signal.SIGTERM)
    with preemption.deferring():
        assert signal.getsignal(signal.SIGTERM) is preemption._on_signal
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_before_training_stops_at_once_and_keeps_the_finished_teacher(
    handlers: None, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdexp import teacher_stage
    from kdexp.run import run
    from kdexp.teacher import Teacher
    from tests.test_pipeline import tiny_cfg

    cache, folder = tmp_path / "cache", tmp_path / "run"
    compute_logits = Teacher._compute_logits

    def interrupted(*args, **kwargs):  # Ctrl+C as the teacher's logits pass starts, after its fine-tuning
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("not reached: the handler raises")

    monkeypatch.setattr(Teacher, "_compute_logits", interrupted)
    with pytest.raises(Preempted) as stopped:
        run(tiny_cfg(tiny_model_dir, glue_dir, cache, "method=vanilla_kd"), folder)
    assert stopped.value.exit_status == 130 and stopped.value.saved is None
    assert not (folder / "results.json").exists()
    assert [p for p in (cache / "teachers").iterdir() if (p / "teacher.json").exists()]  # the finished stage is kept

    monkeypatch.setattr(Teacher, "_compute_logits", compute_logits)
    monkeypatch.setattr(teacher_stage, "_finetune_teacher", lambda *a, **k: pytest.fail("fine-tuned again"))
    preemption._state.signum = None  # a new process, as the rerun would be
    assert run(tiny_cfg(tiny_model_dir, glue_dir, cache, "method=vanilla_kd"), folder)["metrics"]


def test_the_checkpoint_clock_counts_steps_from_the_start_and_minutes_from_the_last_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert [step for step in range(8) if CheckpointClock(CheckpointEvery(n_steps=3)).due(step)] == [3, 6]
    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    clock = CheckpointClock(CheckpointEvery(minutes=30))
    now[0] += 29 * 60
    assert not clock.due(1)
    now[0] += 60
    assert clock.due(1)
    clock.saved()
    assert not clock.due(2)
    assert not CheckpointClock(CheckpointEvery()).due(10**6)


def test_sigterm_during_mlm_adaptation_saves_there_and_resumes_to_the_same_weights(
    handlers: None, one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdexp.smoothing.mlm import AdaptationCheckpoints

    encoder, tokenizer, texts = tiny_encoder(tmp_path)
    straight_adaptation = adapt(encoder, tokenizer, texts)
    checkpoints = AdaptationCheckpoints(tmp_path / "partial" / "adaptation.ckpt", "key", CheckpointEvery())
    monkeypatch.setenv("KDEXP_FAULT_AT", "mlm_adapt_step:step=4")  # SIGTERM as step 4 starts: saved after it
    monkeypatch.setenv("KDEXP_FAULT_ACTION", "signal:TERM")
    with pytest.raises(Preempted) as stopped:
        adapt(encoder, tokenizer, texts, checkpoints)
    assert stopped.value.saved == f"an MLM adaptation checkpoint at step 5 in {checkpoints.path}"
    monkeypatch.delenv("KDEXP_FAULT_AT")
    preemption._state.signum = None  # a new process, as the rerun would be
    assert_same_adaptation(straight_adaptation, adapt(encoder, tokenizer, texts, checkpoints))
