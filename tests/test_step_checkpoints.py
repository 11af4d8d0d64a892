"""Step checkpoints: `last.ckpt` inside an epoch (`checkpoint.every_n_steps` / `every_minutes`), and a run,
a teacher's fine-tuning or an MLM adaptation resumed from one ends exactly as an uninterrupted one.

`KDEXP_FAULT_AT` (kdexp.faults) kills a `kdexp-train` subprocess with SIGKILL right after a step
checkpoint; the rerun must give the same `metrics.csv`, results, step log and student weights, bit for
bit. Tiny BERT and tiny GLUE files (12 training rows: 3 batches of 4 per epoch), as in
tests/test_reproducibility.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from kdexp.errors import ConfigError
from kdexp.run import run
from kdexp.training import EpochSeededSampler, resumable_checkpoint
from tests.conftest import make_glue_dir, tiny_bert_config, tiny_tokenizer
from tests.test_pipeline import tiny_cfg
from tests.test_reproducibility import assert_same_run, finished, killed, tiny_args, train

# vanilla_kd for 3 epochs of 3 batches: seed 3 as in test_reproducibility's kill test.
RUN = ["method=vanilla_kd", "trainer.max_epochs=3", "seed=3"]


@pytest.fixture(scope="session")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, tiny GLUE files, a cache with their teacher, and a run of `RUN` never interrupted
    (default `checkpoint.*`: no step checkpoint in so short a run)."""
    root = tmp_path_factory.mktemp("straight")
    torch.manual_seed(0)  # the model of conftest's tiny_model_dir
    model = root / "tiny-bert"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    paths = {
        "model": model,
        "glue": make_glue_dir(root / "glue"),
        "cache": root / "cache",
        "run": root / "run",
        "root": root,
    }
    finished(train(tiny_args(paths["model"], paths["glue"], paths["cache"], paths["run"], *RUN), root))
    return paths


def stored_teacher(cache: Path) -> Path:
    [store] = [p for p in (cache / "teachers").iterdir() if (p / "teacher.json").exists()]
    return store


def test_run_killed_right_after_a_step_checkpoint_resumes_from_that_step(
    straight: dict[str, Path], tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    args = tiny_args(
        straight["model"], straight["glue"], straight["cache"], resumed, *RUN, "checkpoint.every_n_steps=1"
    )
    # Epoch 1's last batch: the step checkpoint there (global step 5) is taken as it starts, then SIGKILL.
    killed(train(args, tmp_path, fault="train_batch:epoch=1:batch=2"))
    assert not (resumed / "results.json").exists()
    start = resumable_checkpoint(resumed / "checkpoints", read_identity(resumed))
    assert start is not None and (start.epoch, start.batch, start.global_step) == (1, 2, 5)

    proc = train(args, tmp_path)
    finished(proc)
    checkpoint = resumed / "checkpoints" / "last.ckpt"
    assert f"Resuming from {checkpoint} in epoch 1 at batch 2 (global step 5)" in proc.stdout + proc.stderr
    results = json.loads((resumed / "results.json").read_text())
    assert results["resumed_from_epoch"] == 1
    assert_same_run(straight["run"], resumed)  # metrics.csv, results' metrics, step log, student weights


def read_identity(run_dir: Path) -> str:
    """The identity the run's checkpoints carry (config hash and number of processes)."""
    from kdexp.training import checkpoint_identity, read_checkpoint

    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint is not None
    identity = checkpoint_identity(checkpoint)
    assert identity is not None
    return identity


def test_step_checkpoints_change_nothing_in_a_run(straight: dict[str, Path], tmp_path: Path) -> None:
    """Saving (every step here) reads states and draws nothing: the run is the uninterrupted one."""
    every_step = tmp_path / "every-step"
    finished(
        train(
            tiny_args(
                straight["model"],
                straight["glue"],
                straight["cache"],
                every_step,
                *RUN,
                "checkpoint.every_n_steps=1",
                "checkpoint.every_minutes=null",
            ),
            tmp_path,
        )
    )
    assert_same_run(straight["run"], every_step)


def test_the_sampler_skips_the_batches_a_step_checkpoint_trained_once() -> None:
    full = list(EpochSeededSampler(12, seed=3, epoch=1, batch_size=4))
    resumed = EpochSeededSampler(12, seed=3, epoch=0, batch_size=4, resume_at=(1, 2))
    assert list(resumed) == list(EpochSeededSampler(12, seed=3, epoch=0, batch_size=4))  # not the epoch to skip in
    resumed.set_epoch(1)
    assert len(resumed) == 12  # Lightning counts the skipped batches as done
    assert list(resumed) == full[8:]
    assert list(resumed) == full  # once: the epoch again (it is not) would be whole
    resumed.set_epoch(2)
    assert list(resumed) == list(EpochSeededSampler(12, seed=3, epoch=2, batch_size=4))
    ranks = [
        EpochSeededSampler(12, seed=3, epoch=1, rank=r, world_size=2, batch_size=4, resume_at=(1, 1)) for r in (0, 1)
    ]
    whole = [list(EpochSeededSampler(12, seed=3, epoch=1, rank=r, world_size=2, batch_size=4)) for r in (0, 1)]
    assert [list(s) for s in ranks] == [rows[2:] for rows in whole]  # each rank's 2 rows of the first batch


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "checkpoint.every_n_steps=0",
            "checkpoint.every_n_steps=0 cannot work: use a positive number of optimiser steps",
        ),
        ("checkpoint.every_minutes=-5", "checkpoint.every_minutes=-5.0 cannot work: use a positive number of minutes"),
        ("checkpoint.every_n_steps=often", "checkpoint.every_n_steps: Value 'often'"),
        (
            "+checkpoint.every_step=3",
            "checkpoint.every_step is not a config key under checkpoint; valid keys: every_minutes, every_n_steps",
        ),
    ],
)
def test_a_bad_checkpoint_setting_is_refused_before_any_work(
    override: str, message: str, tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=vanilla_kd", override)
    with pytest.raises(ConfigError) as raised:
        run(cfg, tmp_path / "run")
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert not (tmp_path / "cache").exists()


def test_a_checkpoint_config_error_is_one_line(tiny_model_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    proc = train(
        tiny_args(tiny_model_dir, glue_dir, tmp_path / "cache", tmp_path / "run", "checkpoint.every_n_steps=0"),
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "kdexp-train: error: checkpoint.every_n_steps=0 cannot work: use a positive number of optimiser steps "
        "(e.g. 1000), or null for none."
    )
    assert "Traceback" not in proc.stderr


def test_checkpoint_settings_decide_nothing_in_the_result_config() -> None:
    from kdexp.config import config_hash

    base = {"seed": 1, "checkpoint": {"every_n_steps": None, "every_minutes": 30}}
    assert config_hash(base) == config_hash({"seed": 1, "checkpoint": {"every_n_steps": 7, "every_minutes": None}})
    assert config_hash(base) == config_hash({"seed": 1})  # run folders from before the block still match


# --------------------------------------------------------------------------- the MLM adaptation


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and contended thread pools on a shared machine slow them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_encoder(tmp_path: Path) -> tuple[Path, object, list[str]]:
    """A BERT encoder without MLM head, its tokenizer, and texts to adapt it on."""
    from transformers import BertModel

    from tests.test_mlm_loading import WORDS, save_with_tokenizer, tiny_config
    from tests.test_mlm_loading import tiny_tokenizer as mlm_tokenizer

    tokenizer = mlm_tokenizer()
    torch.manual_seed(0)
    path = save_with_tokenizer(BertModel(tiny_config(tokenizer)), tokenizer, tmp_path / "encoder")
    return path, tokenizer, [" ".join(WORDS[:length]) for length in range(4, 13)] * 4


def adapt(
    encoder: Path, tokenizer: object, texts: list[str], checkpoints: object = None, groups: list[str] | None = None
) -> object:
    from kdexp.smoothing.mlm import adapt_mlm_head

    # The encoder trains too: dropout draws from the global generator, which a resume must restore.
    return adapt_mlm_head(
        encoder,
        texts,
        tokenizer,
        train_encoder=True,
        steps=10,
        batch_size=8,
        learning_rate=1e-2,
        heldout_fraction=0.25,
        heldout_groups=groups,
        seed=0,
        eval_every=4,
        log_every=5,
        checkpoints=checkpoints,
    )


def assert_same_adaptation(a: object, b: object) -> None:
    state_a, state_b = a.model.state_dict(), b.model.state_dict()  # type: ignore[attr-defined]
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    timing = ("train_seconds", "total_seconds")
    assert (
        {k: v for k, v in a.metrics.items() if k not in timing}  # type: ignore[attr-defined]
        == {k: v for k, v in b.metrics.items() if k not in timing}
    )  # type: ignore[attr-defined]


@pytest.mark.parametrize("split", ["rows", "by_passage"])
def test_mlm_adaptation_killed_after_a_step_checkpoint_resumes_to_the_same_weights(
    one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str
) -> None:
    from kdexp.faults import InjectedFault
    from kdexp.preemption import CheckpointEvery
    from kdexp.smoothing.mlm import AdaptationCheckpoints

    encoder, tokenizer, texts = tiny_encoder(tmp_path)
    # Multiple choice and QA hold out whole passages (9 here, 4 questions each): a second cold run and a
    # resumed one must draw the same passages and reach the same weights.
    groups = [f"passage {i % 9}" for i in range(len(texts))] if split == "by_passage" else None
    straight = adapt(encoder, tokenizer, texts, groups=groups)
    if groups is not None:
        assert_same_adaptation(straight, adapt(encoder, tokenizer, texts, groups=groups))
        assert straight.metrics["heldout_examples"] % 4 == 0  # whole passages
    checkpoints = AdaptationCheckpoints(tmp_path / "partial" / "adaptation.ckpt", "key-1", CheckpointEvery(n_steps=3))
    monkeypatch.setenv("KDEXP_FAULT_AT", "mlm_adapt_step:step=7")  # a crash as step 7 starts, after step 6's save
    monkeypatch.setenv("KDEXP_FAULT_ACTION", "raise")
    with pytest.raises(InjectedFault):
        adapt(encoder, tokenizer, texts, checkpoints, groups)
    saved = torch.load(checkpoints.path, weights_only=True)
    assert saved["progress"]["step"] == 6 and len(saved["progress"]["losses"]) == 6
    monkeypatch.delenv("KDEXP_FAULT_AT")
    resumed = adapt(encoder, tokenizer, texts, checkpoints, groups)
    assert_same_adaptation(straight, resumed)


def test_an_mlm_checkpoint_of_another_adaptation_is_set_aside(
    one_thread: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdexp.faults import InjectedFault
    from kdexp.preemption import CheckpointEvery
    from kdexp.smoothing.mlm import AdaptationCheckpoints

    encoder, tokenizer, texts = tiny_encoder(tmp_path)
    path = tmp_path / "partial" / "adaptation.ckpt"
    monkeypatch.setenv("KDEXP_FAULT_AT", "mlm_adapt_step:step=4")
    monkeypatch.setenv("KDEXP_FAULT_ACTION", "raise")
    with pytest.raises(InjectedFault):
        adapt(encoder, tokenizer, texts, AdaptationCheckpoints(path, "key-1", CheckpointEvery(n_steps=2)))
    monkeypatch.delenv("KDEXP_FAULT_AT")
    other = adapt(encoder, tokenizer, texts, AdaptationCheckpoints(path, "key-2", CheckpointEvery()))
    assert path.with_name("adaptation.ckpt.other").exists()
    assert_same_adaptation(adapt(encoder, tokenizer, texts), other)  # from the start, not from key-1's step 4


def test_the_step_log_keeps_the_rows_before_a_step_checkpoint_and_drops_the_later_ones(tmp_path: Path) -> None:
    """A killed run may have flushed rows logged after its step checkpoint (the CSV logger flushes every 100
    steps): they are logged again by the resumed run, so they go; the checkpoint's epoch's earlier rows stay."""
    from kdexp.loggers import _resumable_csv_logger
    from kdexp.training import ResumeFrom, truncate_step_logs

    log = tmp_path / "csv" / "metrics.csv"
    log.parent.mkdir()
    rows = [
        "epoch,lr-AdamW,step,train/loss,val/accuracy",
        "0,,0,0.7,",
        ",0.1,1,,",
        "0,,1,0.6,",
        "0,,1,,0.5",
        ",0.1,2,,",
        "1,,2,0.5,",
        ",0.1,3,,",
        "1,,3,0.4,",
        ",0.1,4,,",
        "1,,4,0.3,",
        "1,,4,,0.75",
        ",0.1,5,,",
        "2,,5,0.2,",
    ]
    log.write_text("\n".join(rows) + "\n")
    logger = _resumable_csv_logger(tmp_path)
    start = ResumeFrom(str(tmp_path / "last.ckpt"), epoch=1, global_step=3, batch=1, logged_steps=3)
    truncate_step_logs([logger], start, is_global_zero=True)
    assert log.read_text().splitlines() == rows[:7]  # epoch 1 keeps its step-2 row; steps 3 on are logged again
    logger.log_metrics({"train/loss": 0.45, "epoch": 1}, step=3)
    logger.save()
    assert log.read_text().splitlines()[-1] == "1,,3,0.45,"


def test_a_best_checkpoint_cut_short_is_set_aside_and_a_whole_one_kept(tmp_path: Path) -> None:
    """Lightning moves `best-*.ckpt` in from TMPDIR, a copy across file systems that a full disk can cut
    short: on resume such a file is set aside (`.corrupt`) and the best epoch chosen again; a whole one stays."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from kdexp.training import ResumePoint

    whole, cut = tmp_path / "best-whole.ckpt", tmp_path / "best-cut.ckpt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(64)}}, whole)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for path, readable in ((whole, True), (cut, False)):
        callback = ModelCheckpoint(dirpath=tmp_path)
        callback.best_model_path, callback.best_model_score = str(path), torch.tensor(0.5)
        callback.best_k_models = {str(path): torch.tensor(0.5)}
        ResumePoint._forget_unreadable_best(callback, is_global_zero=True)
        assert (callback.best_model_path == str(path)) is readable
        assert path.exists() is readable
        assert path.with_name(path.name + ".corrupt").exists() is not readable
        if not readable:
            assert callback.best_model_score is None and callback.best_k_models == {}
