"""Sweeps go on: every job is checked before the first starts, and a job that fails at run time is
recorded (failed.json) while the others run to their results; the sweep then lists it and exits 1."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from kdexp.config import CONFIG_DIR
from kdexp.run_folder import FAILED_FILE, LockHolder
from kdexp.sweep import check_jobs, failed_jobs, job_name, record_failure, sweep_jobs
from kdexp.train import SWEEP_CALLBACK, with_sweep_callback
from tests.test_reproducibility import tiny_args

FAULT = {"KDEXP_FAULT_AT": "train_batch:job=0:epoch=0:batch=1", "KDEXP_FAULT_ACTION": "raise"}


def sweep(args: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdexp.train", "-m", *args],
        env=sweep_env(env_vars),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def sweep_env(env_vars: dict[str, str]) -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        **env_vars,
    )
    for name in ("KDEXP_FAULT_AT", "KDEXP_FAULT_ACTION"):
        if name not in env_vars:
            env.pop(name, None)
    return env


def sweep_in_its_own_group(
    args: list[str], cwd: Path, grace_until: str, **env_vars: str
) -> subprocess.CompletedProcess:
    """A sweep in its own process group (a signal to the group reaches its workers, not pytest), its output in
    files: joblib's idle workers outlive a launching process ended by a signal (for loky's idle timeout) and
    would hold a pipe open. The launching process ends at once; its workers then get a grace period, as
    SLURM's KillWait gives a job's processes, until `grace_until` is in the sweep's stderr (at most 60 s),
    and the group is killed."""
    out, err = cwd / "sweep.out", cwd / "sweep.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdexp.train", "-m", *args],
            env=sweep_env(env_vars),
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        returncode = proc.wait(timeout=900)
    deadline = time.monotonic() + 60
    while grace_until not in err.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return subprocess.CompletedProcess(proc.args, returncode, out.read_text(), err.read_text())


def sweep_args(model: Path, glue: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = tiny_args(model, glue, tmp_path / "cache", tmp_path / "unused", "method=vanilla_kd", "trainer.max_epochs=1")
    return [*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]


# --------------------------------------------------------------------------- checked before the first job


@pytest.mark.parametrize(
    "swept,line",
    [
        (
            ["data.max_length=32,65"],
            "job #1 (data.max_length=65) of the sweep: data.max_length=65 is above the 64 positions of teacher.name_or_path=",
        ),
        (
            ["++method.alpha=0.5", "method=vanilla_kd,finetune"],
            "job #1 (method=finetune) of the sweep: method 'finetune' takes no options; got method.alpha.",
        ),
        (
            ["method=vanilla_kd,nosuch"],
            "job #1 (method=nosuch) of the sweep: In 'config': Could not find 'method/nosuch'.",
        ),
    ],
)
def test_a_bad_value_in_the_second_job_stops_the_sweep_before_the_first_trains(
    swept: list[str], line: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    proc = sweep(sweep_args(tiny_model_dir, glue_dir, tmp_path, *swept), tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [error] = [x for x in proc.stderr.splitlines() if x.startswith("kdexp-train: error:")]
    assert error.startswith(f"kdexp-train: error: {line}") and "No job has started" in error
    assert not (tmp_path / "sweep").exists()  # no job folder, no lock left behind
    assert not (tmp_path / "cache").exists()  # no teacher trained


def test_the_jobs_are_those_the_basic_sweeper_launches() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):

        def master(*overrides: str):
            return GlobalHydra.instance().hydra.compose_config(
                "config", list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False
            )

        jobs = sweep_jobs(master("seed=1,2", "method=finetune,vanilla_kd"))
        assert jobs == [
            ["seed=1", "method=finetune"],
            ["seed=1", "method=vanilla_kd"],
            ["seed=2", "method=finetune"],
            ["seed=2", "method=vanilla_kd"],
        ]
        assert job_name(3, jobs[3], jobs) == "job #3 (seed=2 method=vanilla_kd)"
        from_params = sweep_jobs(master("experiment=dbkd_cpu", "seed=4"))  # hydra.sweeper.params, seed from the command
        assert len(from_params) == 8 and {job[1] for job in from_params} == {"seed=4"}
        assert job_name(0, ["seed=1"], [["seed=1"]]) == "job #0"


def test_a_sweeper_that_samples_as_it_goes_is_not_prechecked(caplog: pytest.LogCaptureFixture) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        master = GlobalHydra.instance().hydra.compose_config(
            "config", ["hparams_search=vanilla_kd", "task=rte"], run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )
        with caplog.at_level(logging.INFO, logger="kdexp.sweep"):
            assert sweep_jobs(master) is None and check_jobs(master) is None
    assert "OptunaSweeper chooses its values as it goes: each job checks its config when it starts." in caplog.text


# --------------------------------------------------------------------------- a job that fails at run time


@pytest.mark.parametrize(
    "launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"]
)
def test_a_job_that_fails_at_run_time_is_recorded_and_the_sweep_goes_on(
    launcher: list[str], tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    args = sweep_args(tiny_model_dir, glue_dir, tmp_path, *launcher, "seed=1,2")
    failing, other = tmp_path / "sweep" / "0_sst2_vanilla_kd_seed1", tmp_path / "sweep" / "1_sst2_vanilla_kd_seed2"
    proc = sweep(args, tmp_path, **FAULT)
    assert proc.returncode == 1, proc.stderr[-5000:]

    assert json.loads((other / "results.json").read_text())["seed"] == 2  # the sweep went on
    assert not (failing / "results.json").exists()
    record = json.loads((failing / FAILED_FILE).read_text())
    error = f"InjectedFault: injected fault at train_batch (KDEXP_FAULT_AT={FAULT['KDEXP_FAULT_AT']})"
    assert record["error"] == error and record["job"] == 0 and "seed=1" in record["overrides"]
    assert "kdexp/faults.py:" in record["last_frame"] and record["last_frame"].endswith(" in _act")
    summary = proc.stderr[proc.stderr.index("kdexp-train: 1 job(s) of the sweep failed") :].splitlines()
    assert summary[1:] == [f"  {failing}: {error}"]
    assert not (tmp_path / "sweep" / ".kdexp-sweep.lock").exists()

    # launched again (the bug fixed): the failed job runs, the finished one is not trained again
    other_results = (other / "results.json").read_text()
    again = sweep(args, tmp_path)
    assert again.returncode == 0, again.stderr[-5000:]
    assert json.loads((failing / "results.json").read_text())["seed"] == 1
    assert not (failing / FAILED_FILE).exists()
    assert (other / "results.json").read_text() == other_results
    assert "this run is finished; not training again" in again.stdout + again.stderr


def test_only_this_sweeps_failures_are_listed(tmp_path: Path) -> None:
    this = LockHolder("host-a", 11, "2025-01-01T10:00:00+00:00")
    earlier = LockHolder("host-a", 7, "2024-12-31T10:00:00+00:00")
    (tmp_path / ".kdexp-sweep.lock").write_text(json.dumps(earlier.__dict__))
    record_failure(tmp_path / "3_old", ValueError("from an earlier sweep\nmore"), 3, ["seed=3"], tmp_path)
    (tmp_path / ".kdexp-sweep.lock").write_text(json.dumps(this.__dict__))
    try:
        raise KeyError("k")
    except KeyError as err:
        record_failure(tmp_path / "0_new", err, 0, ["seed=1"], tmp_path)
    [(folder, record)] = failed_jobs(tmp_path, this)
    assert folder == tmp_path / "0_new" and record["error"] == "KeyError: 'k'"
    assert record["last_frame"].endswith("in test_only_this_sweeps_failures_are_listed")
    assert json.loads((tmp_path / "3_old" / FAILED_FILE).read_text())["error"] == "ValueError: from an earlier sweep"


def test_the_sweep_callback_goes_next_to_the_other_overrides() -> None:
    assert with_sweep_callback(["kdexp-train", "a=1", "-m"]) == ["kdexp-train", SWEEP_CALLBACK, "a=1", "-m"]
    assert with_sweep_callback(["kdexp-train", "-m", "a=1,2"]) == ["kdexp-train", "-m", SWEEP_CALLBACK, "a=1,2"]
    assert with_sweep_callback(["kdexp-train", "--cfg", "job"]) == ["kdexp-train", SWEEP_CALLBACK, "--cfg", "job"]
    assert with_sweep_callback(["kdexp-train", "-m", SWEEP_CALLBACK]) == ["kdexp-train", "-m", SWEEP_CALLBACK]
    assert with_sweep_callback(["kdexp-train", "--shell-completion", "query=x"]) == [
        "kdexp-train",
        "--shell-completion",
        "query=x",
    ]


def test_a_signal_stops_the_sweep_names_the_jobs_it_left_undone_and_a_relaunch_runs_them(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM in job #1 of three: the job saves its step checkpoint, the sweep exits 143 naming jobs #1
    and #2 as not finished, and the same sweep launched again finishes them, leaving job #0 as it was."""
    args = sweep_args(tiny_model_dir, glue_dir, tmp_path, "seed=1,2,3")
    jobs = [tmp_path / "sweep" / f"{num}_sst2_vanilla_kd_seed{num + 1}" for num in range(3)]
    proc = sweep(args, tmp_path, KDEXP_FAULT_AT="train_batch:job=1:epoch=0:batch=0", KDEXP_FAULT_ACTION="signal:TERM")
    assert proc.returncode == 143, proc.stderr[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdexp-train:")]
    assert lines[0].startswith("kdexp-train: stopped by SIGTERM: saved a step checkpoint")
    assert lines[1:] == [
        "kdexp-train: the sweep stopped in job #1: 2 of its 3 jobs did not finish: job #1 (seed=2), "
        "job #2 (seed=3); launch the same sweep again to run them (its finished jobs are not trained again)."
    ]
    assert (jobs[0] / "results.json").exists() and not (jobs[1] / "results.json").exists() and not jobs[2].exists()

    first = (jobs[0] / "results.json").read_text()
    again = sweep(args, tmp_path)
    assert again.returncode == 0, again.stderr[-5000:]
    assert (jobs[0] / "results.json").read_text() == first
    assert [json.loads((job / "results.json").read_text())["seed"] for job in jobs] == [1, 2, 3]


def test_a_signal_to_every_process_of_a_joblib_sweep_saves_its_running_job_and_a_relaunch_ends_as_uninterrupted(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    """SLURM cancels or pre-empts a job by signalling all its processes: with the joblib launcher, the launching
    process (it ends at once, as a shell sees SIGTERM: status 143) and the workers, whose running jobs save their
    step checkpoints. The same sweep launched again ends with the results of a sweep never stopped."""
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2"]
    args = sweep_args(tiny_model_dir, glue_dir, tmp_path, *joblib)
    stop = {"KDEXP_FAULT_AT": "train_batch:job=1:epoch=0:batch=1", "KDEXP_FAULT_ACTION": "signal-group:TERM"}
    job = tmp_path / "sweep" / "1_sst2_vanilla_kd_seed2"
    saved = f"kdexp-train: stopped by SIGTERM: saved a step checkpoint at epoch 0, batch 2 (global step 2) in {job}"
    proc = sweep_in_its_own_group(args, tmp_path, grace_until=saved, **stop)
    assert proc.returncode in (143, -signal.SIGTERM), proc.stderr[-5000:]
    assert saved in proc.stderr, proc.stderr[-5000:]
    assert not (job / "results.json").exists() and (job / "checkpoints" / "last.ckpt").exists()

    again = sweep(args, tmp_path)
    assert again.returncode == 0, again.stderr[-5000:]
    reference_args = [
        a if not a.startswith("hydra.sweep.dir=") else f"hydra.sweep.dir={tmp_path / 'ref'}" for a in args
    ]
    reference = sweep(reference_args, tmp_path)
    assert reference.returncode == 0, reference.stderr[-5000:]
    for name in ("0_sst2_vanilla_kd_seed1", "1_sst2_vanilla_kd_seed2"):
        resumed = json.loads((tmp_path / "sweep" / name / "results.json").read_text())
        uninterrupted = json.loads((tmp_path / "ref" / name / "results.json").read_text())
        assert resumed["metrics"] == uninterrupted["metrics"] and resumed["seed"] == uninterrupted["seed"]
