"""A run folder (and a sweep folder) has one owner: a second launch into a folder a live process holds
stops in one line naming it; a lock left by a dead process is taken over, so a re-launch resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdexp.errors import ConfigError
from kdexp.hardware import RANK_VARIABLES
from kdexp.run_folder import LOCK_FILE, LockHolder, acquire_folder_lock, claim_folder, release_folder
from tests.test_reproducibility import assert_same_run, finished, killed, tiny_args, train

HOST = socket.gethostname()
# Results that differ between two runs of one config: timings and the folder the student went to.
RUN_SPECIFIC = ("train_seconds", "train_examples_per_second", "wall_seconds", "student_dir")


def launch(args: list[str], cwd: Path, **env_vars: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        **env_vars,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "kdexp.train", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def comparable(results_file: Path) -> dict:
    return {k: v for k, v in json.loads(results_file.read_text()).items() if k not in RUN_SPECIFIC}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kdexp-train: error:")]


def hold_in_another_process(folder: Path, tmp_path: Path) -> subprocess.Popen:
    """A process that holds `folder` until it is killed."""
    code = (
        "import sys, time; from pathlib import Path; from kdexp.run_folder import acquire_folder_lock; "
        f"lock = acquire_folder_lock(Path(sys.argv[1]), {LOCK_FILE!r}, 'x'); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


# --------------------------------------------------------------------------- the lock itself


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder, tmp_path)
    try:
        with pytest.raises(ConfigError) as refused:
            acquire_folder_lock(folder, LOCK_FILE, "launch elsewhere.")
        message = str(refused.value)
        assert "\n" not in message and message.startswith(
            f"{folder} is in use by pid {holder.pid} on host {HOST} (started "
        )
        assert message.endswith("launch elsewhere.")
    finally:
        holder.kill()
        holder.wait()
    assert LockHolder.read(folder / LOCK_FILE).pid == holder.pid  # kill -9 leaves the file, not the OS lock

    lock = acquire_folder_lock(folder, LOCK_FILE, "launch elsewhere.")
    assert LockHolder.read(folder / LOCK_FILE) == lock.holder and lock.holder.pid == os.getpid()
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_kept_by_a_child_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK_FILE).write_text(json.dumps({"host": HOST, "pid": int(dead.stdout), "started": "earlier"}))
    import fcntl

    with open(folder / LOCK_FILE) as orphan:  # as a data loader worker that outlived its run would hold it
        fcntl.flock(orphan, fcntl.LOCK_EX)
        lock = acquire_folder_lock(folder, LOCK_FILE, "x")
        assert LockHolder.read(folder / LOCK_FILE).pid == os.getpid()
        lock.release()


def test_ddp_ranks_above_zero_share_the_folder_of_rank_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder, tmp_path)
    try:
        for variable in RANK_VARIABLES:  # LOCAL_RANK, NODE_RANK (Lightning), RANK, SLURM_PROCID
            monkeypatch.setenv(variable, "1")
            assert claim_folder(folder, LOCK_FILE, "x") is False  # not refused, and holds nothing
            monkeypatch.delenv(variable)
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid}"):
            claim_folder(folder, LOCK_FILE, "x")
    finally:
        holder.kill()
        holder.wait()
    assert claim_folder(folder, LOCK_FILE, "x") is True
    assert claim_folder(folder, LOCK_FILE, "x") is False  # held already by this process: a no-op
    release_folder(folder)
    assert not (folder / LOCK_FILE).exists()


# --------------------------------------------------------------------------- two launches


def test_a_second_launch_into_a_live_run_folder_is_refused_and_the_first_ends_as_if_alone(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache, extra = tmp_path / "cache", ["method=vanilla_kd", "trainer.max_epochs=2"]
    alone = tmp_path / "alone"
    finished(train(tiny_args(tiny_model_dir, glue_dir, cache, alone, *extra), tmp_path))

    folder, release = tmp_path / "run", tmp_path / "release"
    first = launch(
        tiny_args(tiny_model_dir, glue_dir, cache, folder, *extra),
        tmp_path,
        KDEXP_FAULT_AT="train_batch:epoch=0:batch=0",
        KDEXP_FAULT_ACTION=f"wait:{release}",
    )
    try:
        wait_for(folder / "config.yaml", first)  # written as training starts (held at its first batch)
        holder = LockHolder.read(folder / LOCK_FILE)
        assert holder.pid == first.pid and holder.host == HOST
        overrides_before = (folder / ".hydra" / "overrides.yaml").read_text()

        second = train([*tiny_args(tiny_model_dir, glue_dir, cache, folder, *extra), "seed=7"], tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        [line] = error_lines(second.stderr)
        assert line == (
            f"kdexp-train: error: {folder} is in use by pid {first.pid} on host {HOST} (started "
            f"{holder.started}); wait for it to end (a re-launch then resumes the run or returns its "
            "result), stop it, or launch in another folder (hydra.run.dir=<another folder>)."
        )
        assert (folder / ".hydra" / "overrides.yaml").read_text() == overrides_before  # still the first launch's
    finally:
        release.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-5000:]
    assert comparable(folder / "results.json") == comparable(alone / "results.json")
    assert_same_run(alone, folder)
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_run_does_not_stop_the_rerun_which_resumes(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    args = tiny_args(tiny_model_dir, glue_dir, tmp_path / "cache", folder, "method=finetune", "trainer.max_epochs=2")
    killed(train(args, tmp_path, fault="train_batch:epoch=1:batch=0"))
    left = LockHolder.read(folder / LOCK_FILE)
    assert left is not None and left.host == HOST and left.pid != os.getpid()  # the killed process's

    proc = train(args, tmp_path)
    finished(proc)
    assert f"took over the lock of pid {left.pid} on host {HOST}" in proc.stdout + proc.stderr
    assert f"Resuming from {folder / 'checkpoints' / 'last.ckpt'} at the start of epoch 1" in proc.stdout + proc.stderr
    assert json.loads((folder / "results.json").read_text())["resumed_from_epoch"] == 1
    assert not (folder / LOCK_FILE).exists()


def test_a_second_sweep_into_a_live_sweep_folder_is_refused(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    sweep, release = tmp_path / "sweep", tmp_path / "release"
    args = [
        "-m",
        *tiny_args(
            tiny_model_dir, glue_dir, tmp_path / "cache", tmp_path / "unused", "method=finetune", "trainer.max_epochs=1"
        ),
        f"hydra.sweep.dir={sweep}",
    ]
    first = launch(
        [*args, "seed=1"], tmp_path, KDEXP_FAULT_AT="train_batch:epoch=0:batch=0", KDEXP_FAULT_ACTION=f"wait:{release}"
    )
    try:
        wait_for(sweep / "0_sst2_finetune_seed1" / "config.yaml", first)
        holder = LockHolder.read(sweep / ".kdexp-sweep.lock")
        assert holder.pid == first.pid

        second = train([*args, "seed=1,2"], tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        [line] = error_lines(second.stderr)
        assert line.startswith(f"kdexp-train: error: {sweep} is in use by pid {first.pid} on host {HOST} (started ")
        assert line.endswith("or launch in another folder (hydra.sweep.dir=<another folder>).")
        assert not (sweep / "1_sst2_finetune_seed2").exists()  # the second sweep started no job
    finally:
        release.touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-5000:]
    assert json.loads((sweep / "0_sst2_finetune_seed1" / "results.json").read_text())["seed"] == 1
    assert not (sweep / ".kdexp-sweep.lock").exists()
