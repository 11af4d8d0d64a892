"""What one run hands a method when the method builds itself (`DistillationModule.from_run`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kdexp.data import TaskData
    from kdexp.methods.base import OptimConfig
    from kdexp.tasks import GlueTask
    from kdexp.teacher import Teacher


@dataclass
class RunContext:
    cfg: "DictConfig"
    task: "GlueTask"
    data: "TaskData"
    student: Any
    teacher: "Teacher"
    optim: "OptimConfig"
    run_dir: Path
    method_info: dict[str, Any] = field(default_factory=dict)  # what the method's stages did; goes into results.json
