"""`kdexp-train`: the Hydra app. One run, or a sweep with `-m` (e.g. `method=finetune,vanilla_kd seed=1,2,3`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kdexp.run import run

log = logging.getLogger(__name__)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The config groups live in the repository's top-level conf/ folder (an absolute path, so that
# the console script finds them wherever it is launched from).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])
    results = run(cfg, run_dir, overrides=list(hydra_cfg.overrides.task), sweep_group=group)
    return float(results["metrics"][f"val/{results['main_metric']}"])


if __name__ == "__main__":
    main()
