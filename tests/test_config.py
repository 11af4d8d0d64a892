"""Every config group option composes; bad overrides fail with Hydra's message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kdexp.config import validate_config
from kdexp.run import resolve_method
from kdexp.tasks import TASKS
from kdexp.train import CONFIG_DIR

GROUPS = ["task", "teacher", "student", "method", "trainer", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "teacher" and option == "finetuned":
        overrides.append("teacher.name_or_path=/some/finetuned")
    if group == "student" and option == "pretrained":
        overrides.append("student.name_or_path=/some/student")
    if group == "task" and option == "custom":
        overrides += ["task.train_file=train.csv", "task.dev_file=dev.csv"]
    cfg = _compose(overrides)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate_config(cfg)  # every YAML option matches the schemas
    if group == "method":
        cls, _ = resolve_method(cfg.method)
        assert cls.__name__


def test_task_options_cover_all_nine_glue_tasks() -> None:
    assert set(_options("task")) == set(TASKS) | {"custom"}
    for name in TASKS:
        assert _compose([f"task={name}"]).task.name == name


def test_quickstart_sets_the_cpu_sst2_setting() -> None:
    cfg = _compose(["experiment=quickstart"])
    assert (cfg.task.name, cfg.method.name, cfg.trainer.accelerator) == ("sst2", "vanilla_kd", "cpu")
    assert cfg.data.max_train_samples == 2000 and cfg.teacher.max_train_samples == 2000


@pytest.mark.parametrize(
    "override,message",
    [
        ("task=sst3", "Could not find 'task/sst3'"),
        ("method=magic_kd", "Could not find 'method/magic_kd'"),
        ("data.max_train_sample=10", "max_train_sample"),
        ("trainer=tpu", "Could not find 'trainer/tpu'"),
    ],
)
def test_unknown_option_or_key_is_refused_by_name(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose([override])
    assert message in str(err.value) + str(err.value.__cause__)


def _sweep_points(experiment: str) -> list[list[str]]:
    """One override list per (task, method) of an experiment's own sweep (its first seed)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params") or {}
    tasks = str(params.get("task", cfg.task.name)).split(",")
    methods = str(params.get("method", cfg.method.name)).split(",")
    return [[f"experiment={experiment}", f"task={t}", f"method={m}"] for t in tasks for m in methods]


@pytest.mark.parametrize(
    "overrides", [p for e in _options("experiment") for p in _sweep_points(e)], ids=lambda o: " ".join(o)
)
def test_every_point_of_every_experiment_sweep_passes_the_config_checks(overrides: list[str]) -> None:
    from kdexp.run import task_from_config

    cfg = _compose(overrides)
    validate_config(cfg)
    cls, _ = resolve_method(cfg.method)
    cls.check_config(cfg, task_from_config(cfg.task))


@pytest.mark.parametrize("value", ["-1", "many", "true"])
def test_bad_num_workers_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(ValueError, match=r"data\.num_workers.*auto, or 0 or more worker processes") as err:
        validate_config(_compose([f"data.num_workers={value}"]))
    assert "\n" not in str(err.value)


def test_loader_resources_follow_the_device() -> None:
    from types import SimpleNamespace

    import torch

    from kdexp.training import loader_resources

    def trainer_on(device: str, devices: int = 1) -> SimpleNamespace:
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), num_devices=devices)

    assert loader_resources("auto", None) == {"num_workers": 0, "pin_memory": False}
    assert loader_resources("auto", trainer_on("cpu")) == {"num_workers": 0, "pin_memory": False}
    cores = __import__("os").cpu_count() or 1
    assert loader_resources("auto", trainer_on("cuda")) == {"num_workers": min(4, cores), "pin_memory": True}
    assert loader_resources("auto", trainer_on("cuda", devices=64))["num_workers"] == 1
    assert loader_resources(2, trainer_on("cpu")) == {"num_workers": 2, "pin_memory": False}


def test_a_run_identity_reads_local_paths_from_the_launch_folder_and_leaves_hub_ids_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdexp.config import config_hash, with_launch_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "my-teacher").mkdir(parents=True)
    flat = {
        "data.glue_dir": "../glue",
        "task.train_file": "~/mine.jsonl",
        "data.hub_dataset": "nyu-mll/glue",  # a Hub id: no such folder here
        "teacher.name_or_path": "models/my-teacher",  # a local folder
        "student.name_or_path": "minilm-l6",  # a name kdexp resolves itself
        "method.mlm.name_or_path": "https://example.org/mlm",
        "seed": 1,
    }
    assert with_launch_paths(flat) == {
        **flat,
        "data.glue_dir": str(tmp_path.parent / "glue"),
        "task.train_file": str(Path.home() / "mine.jsonl"),
        "teacher.name_or_path": str(tmp_path / "models" / "my-teacher"),
    }
    spelled = {"data": {"glue_dir": f"{tmp_path}/../glue"}, "seed": 1}
    assert config_hash({"data": {"glue_dir": "../glue"}, "seed": 1}) == config_hash(spelled)
    assert config_hash({"data": {"glue_dir": "glue"}, "seed": 1}) != config_hash(spelled)


def test_a_data_folder_the_run_never_reads_is_not_part_of_its_identity() -> None:
    """GLUE_DIR / MRC_DIR exported or not: a run that reads neither folder keeps its identity (a relaunch of a
    finished SQuAD-subset sweep from a shell with MRC_DIR set was refused as another config)."""
    from kdexp.config import config_hash

    def identity(task: str, glue_dir: str | None = None, mrc_dir: str | None = None, own: str | None = None) -> str:
        data = {"glue_dir": glue_dir, "mrc_dir": mrc_dir}
        return config_hash({"task": {"name": task, "train_file": own}, "data": data, "seed": 1})

    assert identity("sst2", mrc_dir="/data/mrc") == identity("sst2")
    assert identity("sst2", glue_dir="/data/glue") != identity("sst2")
    assert identity("dream", glue_dir="/data/glue") == identity("dream")
    assert identity("dream", mrc_dir="/data/mrc") != identity("dream")
    own = identity("squad_v2", own="/data/squad.json")
    assert identity("squad_v2", glue_dir="/data/glue", mrc_dir="/data/mrc", own="/data/squad.json") == own
    assert identity("squad_v2", own="/data/other.json") != own
