"""What one run hands a method when the method builds itself (`DistillationModule.from_run`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdexp.cache import atomic_write_json

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kdexp.config import OptimConfig
    from kdexp.data import TaskData
    from kdexp.hardware import Hardware
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

    @property
    def hardware(self) -> "Hardware":
        """The run's devices and precision (the teacher's passes run on them too)."""
        return self.teacher.hardware

    def write_run_file(self, name: str, record: dict[str, Any]) -> None:
        """A JSON record in the run folder, written by global rank 0 only (under DDP every process builds
        the method; one writes). Nothing is written for a context without a run folder (tools' `run_dir="."`)."""
        run_dir = Path(self.run_dir)
        if not self.hardware.is_global_zero or run_dir.resolve() == Path.cwd().resolve():
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / name, record)
