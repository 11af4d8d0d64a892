"""Scaling out on the engines users already have: Hydra's joblib and submitit launchers, Optuna, Lightning DDP.

Each runs for real on the tiny BERT and tiny GLUE files, through `python -m kdexp.train` as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

from kdexp.training import EpochSeededSampler
from tests.conftest import make_glue_dir, tiny_bert_config, tiny_tokenizer

TINY = [
    "teacher.epochs=1",
    "teacher.batch_size=4",
    "data.batch_size=4",
    "data.max_length=32",
    "trainer.enable_progress_bar=false",
    "optim.learning_rate=1e-3",
    "student.num_layers=2",
    "logger=csv",
    "trainer.max_epochs=2",
]


def train(tmp_path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("KDEXP_FAULT_AT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kdexp.train", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def common(model: Path, glue: Path, cache: Path) -> list[str]:
    return [f"teacher.name_or_path={model}", f"data.glue_dir={glue}", f"cache_dir={cache}", *TINY]


def results_under(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("results.json"))]


def test_ddp_shards_cut_each_global_batch_between_the_ranks() -> None:
    single = EpochSeededSampler(10, seed=3, epoch=1)
    ranks = [EpochSeededSampler(10, seed=3, epoch=1, rank=r, world_size=2, batch_size=4) for r in (0, 1)]
    order = list(single)
    assert [list(s) for s in ranks] == [order[0:2] + order[4:6] + order[8:9], order[2:4] + order[6:8] + order[9:10]]
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(10)) and [len(s) for s in ranks] == [5, 5]
    with pytest.raises(ValueError, match="multiple of the 2 DDP processes"):
        EpochSeededSampler(10, seed=3, rank=0, world_size=2, batch_size=3)


@pytest.fixture
def no_dropout_model(tmp_path: Path) -> Path:
    """Without dropout, two DDP processes on half-batches compute exactly one process's gradients."""
    torch.manual_seed(0)
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path = tmp_path / "tiny-no-dropout"
    BertForSequenceClassification(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_ddp_on_cpu_with_two_processes_matches_one_process(no_dropout_model: Path, tmp_path: Path) -> None:
    glue = make_glue_dir(tmp_path / "glue")
    args = [*common(no_dropout_model, glue, tmp_path / "cache"), "method=vanilla_kd"]
    # DDP first, from a cold cache: the first process trains the teacher before Lightning launches the second.
    train(
        tmp_path,
        *args,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={tmp_path / 'ddp'}",
        timeout=600,
    )
    train(tmp_path, *args, f"hydra.run.dir={tmp_path / 'single'}")
    single, ddp = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("single", "ddp"))
    assert single["teacher_key"] == ddp["teacher_key"]  # one teacher, trained once, by one process
    assert len([p for p in (tmp_path / "cache" / "teachers").iterdir() if p.is_dir()]) == 1
    assert ddp["metrics"] == pytest.approx(single["metrics"], abs=1e-6)
    a, b = (load_file(str(tmp_path / name / "student" / "model.safetensors")) for name in ("single", "ddp"))
    for name in a:  # gradients averaged over the two half-batches equal one process's, up to float rounding
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [p.name for p in (tmp_path / "ddp").glob("results.json")] == ["results.json"]


def test_joblib_jobs_run_in_parallel_and_share_one_teacher(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    train(
        tmp_path,
        "-m",
        *common(tiny_model_dir, glue_dir, tmp_path / "cache"),
        "method=vanilla_kd",
        "seed=1,2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
    )
    results = results_under(sweep)
    assert sorted(r["seed"] for r in results) == [1, 2] and len({r["teacher_key"] for r in results}) == 1
    assert len([p for p in (tmp_path / "cache" / "teachers").iterdir() if p.is_dir()]) == 1


def test_submitit_local_runs_a_two_job_sweep(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    train(
        tmp_path,
        "-m",
        *common(tiny_model_dir, glue_dir, tmp_path / "cache"),
        "method=finetune,vanilla_kd",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
    )
    assert sorted(r["method"] for r in results_under(sweep)) == ["finetune", "vanilla_kd"]


def test_the_slurm_preset_names_its_resources() -> None:
    from hydra import compose, initialize_config_dir

    from kdexp.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        launcher = compose(
            config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True
        ).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min) == (1, 8, 32, 240)


def test_optuna_search_maximises_the_dev_metric(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    train(
        tmp_path,
        "-m",
        *common(tiny_model_dir, glue_dir, tmp_path / "cache"),
        "hparams_search=vanilla_kd",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    trials = results_under(sweep)
    assert len(trials) == 2 and {r["method"] for r in trials} == {"vanilla_kd"}
    alphas = {r["config"]["method"]["alpha"] for r in trials}
    assert len(alphas) == 2 and all(0.1 <= a <= 0.9 for a in alphas)  # sampled from the search space
    import yaml

    hydra_files = sorted(sweep.glob("*/.hydra/hydra.yaml"))
    assert len(hydra_files) == 2
    assert yaml.safe_load(hydra_files[0].read_text())["hydra"]["sweeper"]["direction"] == "maximize"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["metrics"]["val/accuracy"] for r in trials)


def test_length_grouping_keeps_every_row_once_cuts_padding_and_depends_on_seed_and_epoch() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (400,), generator=generator).tolist()

    def padded_tokens(order: list[int], batch: int = 8) -> int:
        return sum(batch * max(lengths[i] for i in order[s : s + batch]) for s in range(0, len(order), batch))

    grouped = EpochSeededSampler(400, seed=1, epoch=2, batch_size=8, lengths=lengths)
    plain = EpochSeededSampler(400, seed=1, epoch=2, batch_size=8)
    assert sorted(grouped) == list(range(400))
    assert padded_tokens(list(grouped)) < 0.8 * padded_tokens(list(plain))
    assert list(grouped) == list(EpochSeededSampler(400, seed=1, epoch=2, batch_size=8, lengths=lengths))
    assert list(grouped) != list(EpochSeededSampler(400, seed=1, epoch=3, batch_size=8, lengths=lengths))
    firsts = [lengths[list(grouped)[s]] for s in range(0, 400, 8)]
    assert firsts != sorted(firsts, reverse=True)  # the batches themselves come in random order
    shards = [
        list(EpochSeededSampler(400, seed=1, epoch=2, rank=r, world_size=2, batch_size=8, lengths=lengths))
        for r in (0, 1)
    ]
    assert sorted(shards[0] + shards[1]) == list(range(400))  # DDP: the grouped order, cut per global batch
