"""`kdexp-train`: the Hydra app. One run, or a sweep with `-m` (e.g. `method=finetune,vanilla_kd seed=1,2,3`).

Only Hydra is imported at start-up, so `--help`, `--cfg job` and shell completion answer fast;
torch, Lightning and transformers load when a run starts. A config, data or model error
(`kdexp.errors.KdexpError`) prints one line and exits with status 2 (`HYDRA_FULL_ERROR=1`
shows the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp.config import CONFIG_DIR
from kdexp.errors import ConfigError, KdexpError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def refuse_ddp_in_a_sweep(cfg: DictConfig, mode: RunMode) -> None:
    """Lightning's DDP re-launches the script once per extra process: under -m it would re-run the sweep."""
    devices = cfg.trainer.get("devices", "auto")
    if mode == RunMode.MULTIRUN and devices != 1:
        raise ConfigError(f"trainer.devices={devices} under -m: several devices mean DDP, which re-launches the script "
                          "per device and would re-run the whole sweep. Launch DDP runs one at a time (without -m), "
                          "or sweep with trainer.devices=1 per job (trainer=gpu) through hydra/launcher=joblib or slurm.")


def share_cores_with_parallel_jobs(launcher: DictConfig) -> None:
    """Under the joblib launcher, give each of its n_jobs processes its share of the cores
    (torch would otherwise start one thread per core in every job)."""
    if "joblib" not in str(launcher.get("_target_", "")):
        return
    import torch

    cores = os.cpu_count() or 1
    jobs = launcher.get("n_jobs", -1)
    jobs = cores if jobs in (None, -1) else max(1, int(jobs))
    torch.set_num_threads(max(1, cores // jobs))


def run_job(cfg: DictConfig) -> float:
    from kdexp.run import run

    hydra_cfg = HydraConfig.get()
    refuse_ddp_in_a_sweep(cfg, hydra_cfg.mode)
    share_cores_with_parallel_jobs(hydra_cfg.launcher)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])
    experiment = hydra_cfg.runtime.choices.get("experiment")
    results = run(cfg, run_dir, overrides=list(hydra_cfg.overrides.task), sweep_group=group,
                  experiment=None if experiment in (None, "null") else experiment)
    return float(results["metrics"][f"val/{results['main_metric']}"])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run_job(cfg)
    except KdexpError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"kdexp-train: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
