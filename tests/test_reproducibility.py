"""Every number a function of the config and the seed: cold or warm cache, killed and resumed or not.

Fault injection: `KDEXP_FAULT_AT` (kdexp.faults) makes a `kdexp-train` subprocess kill itself
with SIGKILL at a chosen point; the re-launched run must end with the same metrics (bit for
bit), the same `metrics.csv` and step log, and the same student weights as a run that was
never interrupted. Tiny BERT and tiny GLUE files from conftest, so the suite runs in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdexp.errors import ConfigError
from kdexp.run import run
from tests.test_pipeline import tiny_cfg

# log_every_n_steps=1: the step log gets training and learning-rate rows, which a resume must keep whole.
TINY = [
    "teacher.epochs=2",
    "teacher.batch_size=4",
    "data.batch_size=4",
    "data.max_length=32",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "optim.learning_rate=1e-3",
    "student.num_layers=2",
    "trainer.log_every_n_steps=1",
]


def tiny_args(model: Path, glue: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"teacher.name_or_path={model}",
        f"data.glue_dir={glue}",
        f"cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *TINY,
        *extra,
    ]


def train(args: list[str], cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.pop("KDEXP_FAULT_AT", None)
    if fault:
        env["KDEXP_FAULT_AT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "kdexp.train", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def finished(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-5000:]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical metrics (results.json, metrics.csv, step log) and student weights."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["metrics"] == rb["metrics"] and ra["best_epoch"] == rb["best_epoch"]
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    step_log = (a / "csv" / "metrics.csv").read_text()
    assert step_log == (b / "csv" / "metrics.csv").read_text()
    assert "train/loss" in step_log.splitlines()[0] and "lr-AdamW" in step_log.splitlines()[0]
    assert_same_weights(a / "student", b / "student")


# --------------------------------------------------------------------------- cold vs warm cache


class TeacherPasses:
    """Counts, in this process, every pass a cache stands in front of: the teacher's fine-tuning, its passes over
    the rows (logits, [CLS] vectors), its decisions, the MLM adaptation and distribution store, the surrogate,
    and the knowledge-selection agent's episodes."""

    STAGES = (
        "teacher_finetuning",
        "teacher_logits",
        "teacher_row_passes",
        "teacher_decisions",
        "mlm_adaptation",
        "mlm_store",
        "surrogate",
        "agent_episodes",
    )

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kdexp.methods.dbkd as dbkd
        import kdexp.smoothing.mlm_teacher as mlm_teacher
        import kdexp.teacher as teacher
        import kdexp.teacher_stage as teacher_stage
        from kdexp.decision.teacher import DecisionTeacher
        from kdexp.selection.stage import AgentStage

        owners = {
            "teacher_finetuning": (teacher_stage, "_finetune_teacher"),
            "teacher_logits": (teacher.Teacher, "_compute_logits"),
            "teacher_row_passes": (teacher, "length_sorted_loader"),  # the logits' and the [CLS] vectors' passes
            "teacher_decisions": (DecisionTeacher, "decide"),
            "mlm_adaptation": (mlm_teacher, "run_adaptation"),
            "mlm_store": (mlm_teacher, "build_topk_store"),
            "surrogate": (dbkd, "train_surrogate"),
            "agent_episodes": (AgentStage, "run_episode"),
        }
        assert tuple(owners) == self.STAGES
        self.counts = dict.fromkeys(self.STAGES, 0)
        for stage, (owner, name) in owners.items():
            original = getattr(owner, name)

            def counted(*args, _stage=stage, _original=original, **kwargs):
                self.counts[_stage] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

    def reset(self) -> dict[str, int]:
        counts, self.counts = self.counts, dict.fromkeys(self.STAGES, 0)
        return counts


@pytest.mark.parametrize(
    "method,extra,stages",
    [
        ("vanilla_kd", [], ["teacher_logits"]),
        ("dbkd", ["method.queries.num_queries=3"], ["teacher_decisions"]),
        (
            "decision_surrogate",
            ["method.queries.num_queries=3", "method.surrogate_epochs=2"],
            ["teacher_decisions", "surrogate"],
        ),
        ("internal_all", ["trainer.max_epochs=2"], ["teacher_logits"]),
        (
            "text_smoothing_kd",
            ["method.mlm.adapt.steps=4", "method.mlm.adapt.batch_size=4", "method.top_k=8"],
            ["teacher_logits", "mlm_adaptation", "mlm_store"],
        ),
        (
            "knowledge_selection",
            [
                "method.agent.episodes=2",
                "method.agent.episode_phases=2",
                "method.phase_steps=2",
                "method.reward.rows=4",
                "method.agent.batch_size=2",
            ],
            ["teacher_logits", "agent_episodes"],
        ),
        ("pkd", [], ["teacher_logits"]),
        ("distilbert_kd", [], ["teacher_logits"]),
    ],
)
def test_cold_and_warm_cache_give_bit_identical_runs(
    method: str,
    extra: list[str],
    stages: list[str],
    tiny_model_dir: Path,
    glue_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    passes = TeacherPasses(monkeypatch)
    cache = tmp_path / "cache"
    overrides = [f"method={method}", "logger=csv", "teacher.epochs=2", "trainer.log_every_n_steps=1", *extra]
    cold = run(tiny_cfg(tiny_model_dir, glue_dir, cache, *overrides), tmp_path / "cold")  # teacher and signals computed
    cold_passes = passes.reset()
    warm = run(tiny_cfg(tiny_model_dir, glue_dir, cache, *overrides), tmp_path / "warm")  # all read from the cache
    warm_passes = passes.reset()
    assert cold_passes["teacher_finetuning"] == 1
    assert all(cold_passes[stage] > 0 for stage in stages), cold_passes
    if method in ("pkd", "knowledge_selection"):  # their [CLS] vectors: a row pass besides the logits'
        assert cold_passes["teacher_row_passes"] > cold_passes["teacher_logits"], cold_passes
    assert warm_passes == dict.fromkeys(TeacherPasses.STAGES, 0)  # the warm run made no teacher pass at all
    assert cold["metrics"] == warm["metrics"]
    assert_same_run(tmp_path / "cold", tmp_path / "warm")


# --------------------------------------------------------------------------- kill -9 and resume


def first_epoch_after_a_non_improving_one(metrics_csv: Path, metric: str = "val/accuracy") -> int:
    rows = metrics_csv.read_text().splitlines()
    header = rows[0].split(",")
    scores = [float(row.split(",")[header.index(metric)]) for row in rows[1:]]
    for epoch in range(1, len(scores) - 1):
        if scores[epoch] <= max(scores[:epoch]):
            return epoch + 1
    raise AssertionError(f"no non-improving epoch in {scores}: choose another seed for this test")


def test_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache, extra = tmp_path / "cache", ["method=vanilla_kd", "trainer.max_epochs=5", "seed=3"]
    straight = tmp_path / "straight"
    finished(train(tiny_args(tiny_model_dir, glue_dir, cache, straight, *extra), tmp_path))
    epoch = first_epoch_after_a_non_improving_one(straight / "metrics.csv")

    resumed = tmp_path / "resumed"
    args = tiny_args(tiny_model_dir, glue_dir, cache, resumed, *extra)
    killed(train(args, tmp_path, fault=f"train_batch:epoch={epoch}:batch=1"))
    assert not (resumed / "results.json").exists()
    assert len((resumed / "metrics.csv").read_text().splitlines()) == 1 + epoch  # epochs 0..epoch-1 finished

    proc = train(args, tmp_path)
    finished(proc)
    assert (
        f"Resuming from {resumed / 'checkpoints' / 'last.ckpt'} at the start of epoch {epoch}"
        in proc.stdout + proc.stderr
    )
    results = json.loads((resumed / "results.json").read_text())
    assert results["resumed_from_epoch"] == epoch  # finished epochs were not redone
    assert_same_run(straight, resumed)


def test_run_killed_after_its_last_epoch_does_not_train_again(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache, extra = tmp_path / "cache", ["method=finetune", "trainer.max_epochs=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finished(train(tiny_args(tiny_model_dir, glue_dir, cache, straight, *extra), tmp_path))
    args = tiny_args(tiny_model_dir, glue_dir, cache, resumed, *extra)
    killed(train(args, tmp_path, fault="train_end"))
    finished(train(args, tmp_path))
    assert json.loads((resumed / "results.json").read_text())["resumed_from_epoch"] == 2
    assert_same_run(straight, resumed)


def test_teacher_stage_killed_mid_epoch_resumes_to_the_same_teacher(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    extra = ["method=vanilla_kd", "trainer.max_epochs=1", "teacher.epochs=3"]
    straight_cache, resumed_cache = tmp_path / "cache-straight", tmp_path / "cache-resumed"
    finished(train(tiny_args(tiny_model_dir, glue_dir, straight_cache, tmp_path / "a", *extra), tmp_path))
    args = tiny_args(tiny_model_dir, glue_dir, resumed_cache, tmp_path / "b", *extra)
    killed(train(args, tmp_path, fault="teacher_train_batch:epoch=1:batch=1"))
    assert not [p for p in (resumed_cache / "teachers").iterdir() if p.name.endswith(tuple("0123456789abcdef"))]
    finished(train(args, tmp_path))

    [straight] = [p for p in (straight_cache / "teachers").iterdir() if (p / "teacher.json").exists()]
    [resumed] = [p for p in (resumed_cache / "teachers").iterdir() if (p / "teacher.json").exists()]
    assert straight.name == resumed.name  # the same key
    info_straight, info_resumed = (json.loads((p / "teacher.json").read_text()) for p in (straight, resumed))
    assert info_resumed["resumed_from_epoch"] == 1 and info_straight["resumed_from_epoch"] is None
    assert info_resumed["dev_metrics_at_training"] == info_straight["dev_metrics_at_training"]
    assert info_resumed["weights_sha256"] == info_straight["weights_sha256"]
    assert_same_weights(straight / "model", resumed / "model")
    assert_same_run(tmp_path / "a", tmp_path / "b")


# --------------------------------------------------------------------------- the teacher's key


def test_trainer_limits_of_a_run_do_not_reach_the_teacher(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    limited = run(
        tiny_cfg(
            tiny_model_dir,
            glue_dir,
            tmp_path / "c1",
            "method=finetune",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=1",
            "+trainer.accumulate_grad_batches=2",
        ),
        tmp_path / "a",
    )
    normal = run(
        tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "c2", "method=finetune", "trainer.max_epochs=1"), tmp_path / "b"
    )
    assert limited["teacher_key"] == normal["teacher_key"]
    assert limited["teacher_metrics"] == normal["teacher_metrics"]
    assert_same_weights(Path(limited["teacher_path"]), Path(normal["teacher_path"]))


def test_every_teacher_setting_is_in_its_key(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    from kdexp.models import model_fingerprint
    from kdexp.run import teacher_spec
    from kdexp.tasks import get_task
    from kdexp.teacher_stage import teacher_key

    def key(*overrides: str) -> str:
        cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", *overrides)
        spec = teacher_spec(cfg)
        return teacher_key(
            spec,
            get_task("sst2"),
            model_fingerprint(str(tiny_model_dir)),
            {"train": "t"},
            cfg.data.max_length,
            str(cfg.trainer.precision),
        )

    base = key()
    for override in (
        "teacher.learning_rate=1e-4",
        "teacher.epochs=2",
        "teacher.batch_size=8",
        "teacher.weight_decay=0",
        "teacher.warmup_ratio=0",
        "teacher.gradient_clip_val=5",
        "teacher.seed=1",
        "data.max_length=16",
        "trainer.precision=bf16-mixed",
    ):
        assert key(override) != base, override


# --------------------------------------------------------------------------- re-launching a folder


def test_relaunch_of_a_finished_folder_with_another_config_is_refused(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache, folder = tmp_path / "cache", tmp_path / "run"
    args = tiny_args(tiny_model_dir, glue_dir, cache, folder, "method=vanilla_kd", "trainer.max_epochs=1")
    finished(train(args, tmp_path))
    results_before = (folder / "results.json").read_text()
    hydra_before = (folder / ".hydra" / "config.yaml").read_text()

    proc = train([*args, "method=finetune", "optim.learning_rate=5e-4"], tmp_path)
    assert proc.returncode == 2
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("kdexp-train: error:")]
    assert "holds a finished run of another config" in line and "method.name: 'vanilla_kd' -> 'finetune'" in line
    assert "optim.learning_rate: 0.001 -> 0.0005" in line and "resume=false" in line
    assert "Traceback" not in proc.stderr
    assert (folder / "results.json").read_text() == results_before
    assert (folder / ".hydra" / "config.yaml").read_text() == hydra_before  # still the config that ran

    # display-only changes are the same run: the stored result comes back without training
    proc = train([*args, "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=true"], tmp_path)
    finished(proc)
    assert "this run is finished" in proc.stdout + proc.stderr

    # the same data folder spelled relative to the launch folder is the same run;
    # another folder is another config, even with the same files in it
    proc = train([*args, f"data.glue_dir={os.path.relpath(glue_dir, tmp_path)}"], tmp_path)
    finished(proc)
    assert "this run is finished" in proc.stdout + proc.stderr
    copy = shutil.copytree(glue_dir, tmp_path / "glue_copy")
    proc = train([*args, "data.glue_dir=glue_copy"], tmp_path)
    assert proc.returncode == 2 and f"data.glue_dir: '{glue_dir}' -> '{copy}'" in proc.stderr
    # a folder the run never reads (a GLUE run and data.mrc_dir, MRC_DIR exported or not) leaves it the same run
    proc = train([*args, f"data.mrc_dir={tmp_path}"], tmp_path)
    finished(proc)
    assert "this run is finished" in proc.stdout + proc.stderr

    # resume=false starts over and keeps the finished result aside
    finished(train([*args, "method=finetune", "resume=false"], tmp_path))
    assert json.loads((folder / "results.json").read_text())["method"] == "finetune"
    assert [json.loads(p.read_text())["method"] for p in folder.glob("results.json.bak-*")] == ["vanilla_kd"]


def test_resuming_a_killed_run_with_another_learning_rate_is_refused(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    args = tiny_args(tiny_model_dir, glue_dir, tmp_path / "cache", folder, "method=finetune", "trainer.max_epochs=3")
    killed(train(args, tmp_path, fault="train_batch:epoch=1:batch=0"))
    proc = train([*args, "optim.learning_rate=5e-4"], tmp_path)
    assert proc.returncode == 2 and "holds an unfinished run of another config" in proc.stderr
    assert (folder / "checkpoints" / "last.ckpt").exists()  # kept: the original config can still resume it


# --------------------------------------------------------------------------- refused before any work


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.max_length=0", r"data.max_length=0 cannot work"),
        ("data.max_length=65", r"data.max_length=65 is above the 64 positions of teacher.name_or_path"),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0 cannot work"),
        ("data.batch_size=0", r"data.batch_size=0 cannot work"),
        ("optim.learning_rate=abc", r"optim.learning_rate: Value 'abc'"),
        ("optim.learning_rate=-1", r"optim.learning_rate=-1.0 cannot work"),
        ("seed=1.5", r"seed: Value '1.5'"),
        ("data.max_train_samples=0", r"max_train_samples=0 cannot work"),
        ("data.max_eval_samples=-2", r"max_eval_samples=-2 cannot work"),
        ("student.num_layers=7", r"student.num_layers=7 cannot be taken from the teacher's 4 layers"),
        ("student.num_layers=0", r"student.num_layers=0 cannot work"),
        ("+method.alph=0.3", r"method.alph is not a config key of method 'vanilla_kd'; valid keys: alpha"),
        ("+optim.learnin_rate=1", r"optim.learnin_rate is not a config key under optim; valid keys: adam_epsilon"),
        (
            "+trainer.limit_train_batchs=1",
            r"trainer.limit_train_batchs is not an argument of pytorch_lightning.Trainer",
        ),
        ("method.alpha=1.5", r"method.alpha=1.5 cannot work"),
        ("teacher.epochs=0", r"teacher.epochs=0 cannot work"),
    ],
)
def test_bad_config_is_refused_before_the_teacher_stage(
    override: str, message: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=vanilla_kd", override)
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=vanilla_kd", "+student.dtype=bfloat16"], r"student.dtype='bfloat16' cannot work: use float32: the"),
        (
            ["method=text_smoothing", "+trainer.accumulate_grad_batches=2"],
            r"trainer.accumulate_grad_batches=2 cannot work with method.schedule=two_steps",
        ),
    ],
)
def test_a_student_in_bf16_weights_and_accumulation_under_two_steps_are_refused_before_any_stage(
    overrides: list[str], message: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", *overrides), tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_config_error_is_one_line_without_traceback(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    proc = train(
        tiny_args(tiny_model_dir, glue_dir, tmp_path / "cache", tmp_path / "run", "data.max_length=0"), tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kdexp-train: error: data.max_length=0 cannot work")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- cache integrity


def stored_teacher(cache: Path) -> Path:
    [store] = [p for p in (cache / "teachers").iterdir() if (p / "teacher.json").exists() and ".corrupt-" not in p.name]
    return store


@pytest.mark.parametrize("damage", ["truncated weights", "garbled teacher.json", "missing weights"])
def test_a_damaged_teacher_is_trained_again_to_the_same_weights(
    damage: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    overrides = ["method=finetune", "trainer.max_epochs=1", "logger=csv", "trainer.log_every_n_steps=1"]
    first = run(tiny_cfg(tiny_model_dir, glue_dir, cache, *overrides), tmp_path / "a")
    store = stored_teacher(cache)
    digest = json.loads((store / "teacher.json").read_text())["weights_sha256"]
    weights_file = store / "model" / "model.safetensors"
    if damage == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    elif damage == "garbled teacher.json":
        (store / "teacher.json").write_text("{not json")
    else:
        weights_file.unlink()

    second = run(tiny_cfg(tiny_model_dir, glue_dir, cache, *overrides), tmp_path / "b")
    assert second["teacher_key"] == first["teacher_key"] and second["teacher_metrics"] == first["teacher_metrics"]
    assert json.loads((stored_teacher(cache) / "teacher.json").read_text())["weights_sha256"] == digest
    assert len(list((cache / "teachers").glob("*.corrupt-*"))) == 1  # set aside, not deleted
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_corrupt_logit_cache_is_recomputed_to_the_same_run(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    overrides = ["method=vanilla_kd", "logger=csv", "trainer.log_every_n_steps=1"]
    run(tiny_cfg(tiny_model_dir, glue_dir, cache, *overrides), tmp_path / "a")
    for entry in (cache / "signals" / "teacher_logits").glob("*.pt"):
        entry.write_bytes(b"\x80garbage")
    run(tiny_cfg(tiny_model_dir, glue_dir, cache, *overrides), tmp_path / "b")
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_cache_files_are_readable_by_the_group(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        run(
            tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=vanilla_kd", "trainer.max_epochs=1"),
            tmp_path / "a",
        )
    finally:
        os.umask(old)
    for path in (tmp_path / "cache").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o040, f"{path} is not group-readable ({oct(mode)})"
        if path.is_dir():
            assert mode & 0o010, f"{path} is not group-searchable ({oct(mode)})"


def test_parallel_runs_share_one_teacher(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kdexp.train",
                *tiny_args(
                    tiny_model_dir,
                    glue_dir,
                    cache,
                    tmp_path / f"run{seed}",
                    "method=vanilla_kd",
                    "trainer.max_epochs=1",
                    f"seed={seed}",
                ),
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(log.count("Fine-tuning teacher") for log in logs) == 1
    assert len([p for p in (cache / "teachers").iterdir() if p.is_dir()]) == 1
    keys = {json.loads((tmp_path / f"run{seed}" / "results.json").read_text())["teacher_key"] for seed in (1, 2)}
    assert len(keys) == 1
