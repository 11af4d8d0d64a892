"""The one owner of devices and precision, for the Trainer and for every stage outside it.

The Lightning Trainer trains the student (and fine-tunes the teacher) with the run's `trainer.*`
keys. Every stage outside it (teacher passes, DBKD queries and surrogate, the MLM top-k store and
MLM adaptation, the knowledge-selection agent) runs through one :class:`Hardware`: a Lightning
Fabric built from the same keys (`accelerator`, `devices`, `strategy`, `precision`, `num_nodes`).
No other module picks a device or an autocast dtype:

- :attr:`Hardware.device` is this process's own device (``cuda:<local rank>`` under DDP), never
  another rank's, so no process opens a context on a GPU it does not train on;
- :meth:`Hardware.autocast` and :meth:`Hardware.inference` apply the precision's autocast
  (none for ``32-true``); :meth:`Hardware.backward`, :meth:`Hardware.optimizer` and
  :meth:`Hardware.clip_gradients` go through Fabric's precision plugin, which scales the loss
  for ``16-mixed``;
- with several processes, :meth:`Hardware.launch` starts them at the start of a run with
  Lightning's script launcher (the Trainer then finds them running and joins them), a pass
  over many rows gives each process every ``world_size``-th batch (:meth:`Hardware.shard`) and
  puts the rows back together on every process (:meth:`Hardware.combine_rows`), and only
  global rank 0 writes files (:func:`is_global_zero`).

A stage that one process runs alone (an optimisation loop: the agent, MLM adaptation, the DBKD
surrogate) takes :meth:`Hardware.single_device`, the same precision on this process's device.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch

from kdexp.errors import ConfigError

T = TypeVar("T")

# The precisions every stage supports; the name a pass's precision has in cache keys.
PASS_PRECISION = {"32-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}
SUPPORTED_PRECISIONS = tuple(PASS_PRECISION)
SupportedPrecision = Literal["32-true", "bf16-mixed", "16-mixed"]
# Strategies that start their processes from the script (the launcher the run's stages share).
SCRIPT_LAUNCHED_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
# Elements per all-reduce when rows are put back together (64 MB of float32).
COMBINE_CHUNK_ELEMENTS = 16 * 1024 * 1024


def _process_group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def distributed_rank() -> tuple[int, int]:
    """``(global rank, world size)`` of this process: ``(0, 1)`` outside a process group."""
    if _process_group_exists():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# A process's rank as Lightning's DDP launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK) or srun (SLURM_PROCID)
# set it before the process group exists.
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """True in the process that writes run files and cache entries (the only process of a plain run): global
    rank 0 of the process group, or, before it exists, a process no launcher gave another rank."""
    if _process_group_exists():
        return distributed_rank()[0] == 0
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


@dataclass(frozen=True)
class HardwareSpec:
    """The `trainer.*` keys that decide where and in what precision tensors live."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1

    @classmethod
    def from_trainer(cls, trainer: Mapping[str, Any]) -> "HardwareSpec":
        devices = trainer.get("devices", 1)
        return cls(
            accelerator=str(trainer.get("accelerator", "cpu")),
            devices=list(devices) if isinstance(devices, (list, tuple)) else devices,
            strategy=str(trainer.get("strategy", "auto")),
            precision=str(trainer.get("precision", "32-true")),
            num_nodes=int(trainer.get("num_nodes", 1)),
        )

    @property
    def one_device(self) -> bool:
        """One process on one device, from the keys alone (`devices=1` or `[k]`, one node)."""
        one = self.devices == 1 or (isinstance(self.devices, list) and len(self.devices) == 1)
        return one and self.num_nodes == 1

    def check(self) -> None:
        """One-line refusals of what no stage can run, before any work."""
        if self.precision not in SUPPORTED_PRECISIONS:
            raise ConfigError(
                f"trainer.precision={self.precision} is not supported by kdexp's stages: use "
                f"{', '.join(SUPPORTED_PRECISIONS)}."
            )
        if self.precision == "16-mixed" and self.accelerator == "cpu":
            raise ConfigError(
                "trainer.precision=16-mixed needs a GPU (fp16 autocast does not run on CPU): use "
                "trainer.precision=bf16-mixed or 32-true on CPU."
            )
        if self.strategy not in SCRIPT_LAUNCHED_STRATEGIES:
            raise ConfigError(
                f"trainer.strategy={self.strategy}: kdexp starts its DDP processes with Lightning's "
                f"script launcher, shared by every stage; use one of {', '.join(SCRIPT_LAUNCHED_STRATEGIES)}."
            )

    def fabric_strategy(self) -> str:
        return "ddp" if self.strategy.startswith("ddp") else self.strategy


class Hardware:
    """The run's devices and precision (a Lightning Fabric made when first needed)."""

    def __init__(self, spec: HardwareSpec | None = None) -> None:
        self.spec = spec or HardwareSpec()
        self.spec.check()

    @classmethod
    def from_trainer(cls, trainer: Mapping[str, Any]) -> "Hardware":
        return cls(HardwareSpec.from_trainer(trainer))

    def __repr__(self) -> str:
        return f"Hardware({self.spec.accelerator}, devices={self.spec.devices}, precision={self.precision})"

    @cached_property
    def fabric(self) -> Any:
        from lightning_fabric import Fabric

        spec = self.spec
        fabric = Fabric(
            accelerator=spec.accelerator,
            devices=spec.devices,
            strategy=spec.fabric_strategy(),
            precision=cast(SupportedPrecision, spec.precision),  # HardwareSpec.check refused any other
            num_nodes=spec.num_nodes,
        )
        if fabric.world_size > 1 and _process_group_exists():
            fabric.launch()  # the processes run already (an earlier launch): join them, start none
        return fabric

    # ------------------------------------------------------------------ processes

    def launch(self) -> None:
        """Start the run's processes (several devices): this process goes on as global rank 0, and each
        other process runs the script from its start with its rank set. A no-op for one device, or when
        the processes run already."""
        if self.fabric.world_size > 1 and not _process_group_exists():
            self.fabric.launch()

    @property
    def world_size(self) -> int:
        return int(self.fabric.world_size)

    @property
    def global_rank(self) -> int:
        return int(self.fabric.global_rank)

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def pass_precision(self) -> str:
        """The precision of a pass as cache keys name it (`fp32`, `bf16`, `fp16`)."""
        return PASS_PRECISION[self.precision]

    def single_device(self) -> "Hardware":
        """This process's device alone, in the run's precision: for stages one process runs."""
        if self.spec.one_device or self.world_size == 1:
            return self
        device = self.device
        devices: Any = [device.index] if device.type == "cuda" and device.index is not None else 1
        return Hardware(replace(self.spec, devices=devices, strategy="auto", num_nodes=1))

    # ------------------------------------------------------------------ placement and precision

    def to_device(self, obj: T) -> T:
        """A module, a tensor, or a collection of tensors on this process's device."""
        return self.fabric.to_device(obj)

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The precision's autocast for forward passes (nothing for 32-true)."""
        with self.fabric.autocast():
            yield

    @contextmanager
    def inference(self) -> Iterator[None]:
        """Inference mode with the precision's autocast: make result tensors outside the block."""
        with torch.inference_mode(), self.fabric.autocast():
            yield

    def optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """The optimizer, stepping through the precision plugin (the gradient scaler of 16-mixed)."""
        return self.fabric.setup_optimizers(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss)

    def clip_gradients(self, module: torch.nn.Module, optimizer: Any, max_norm: float) -> None:
        """Clip the gradient norm (unscaled first under 16-mixed); a non-finite norm is left to the scaler."""
        self.fabric.clip_gradients(module, optimizer, max_norm=max_norm, error_if_nonfinite=False)

    # ------------------------------------------------------------------ passes over many rows

    def shard(self, batches: Sequence[T]) -> list[T]:
        """This process's share of a pass: every ``world_size``-th batch from its rank on."""
        return list(batches[self.global_rank :: self.world_size])

    def combine_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Put together a tensor whose rows each process filled for its own batches (zeros elsewhere).

        Every row is written by exactly one process, so the sum over processes is that row
        exactly. Done in place, chunk by chunk; returns ``rows``.
        """
        if self.world_size == 1:
            return rows
        flat = rows.view(-1)
        for start in range(0, flat.numel(), COMBINE_CHUNK_ELEMENTS):
            chunk = self.to_device(flat[start : start + COMBINE_CHUNK_ELEMENTS].clone())
            torch.distributed.all_reduce(chunk, op=torch.distributed.ReduceOp.SUM)
            flat[start : start + chunk.numel()] = chunk.to(flat.device)
        return rows

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds in every process (each must call it)."""
        if self.world_size == 1:
            return flag
        value = self.to_device(torch.tensor([1 if flag else 0], dtype=torch.long))
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            self.fabric.barrier()


# --------------------------------------------------------------------------- one GPU per sweep job


GPU_LEASE_DIR_ENV = "KDEXP_GPU_LEASE_DIR"
LEASE_POLL_SECONDS = 5.0


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_lease_dir() -> Path:
    """Where the jobs of one machine record which GPU each holds (one lock file per physical GPU)."""
    return Path(os.environ.get(GPU_LEASE_DIR_ENV) or Path(tempfile.gettempdir()) / f"kdexp-gpu-leases-{os.getuid()}")


def physical_gpu_ids(count: int) -> list[str]:
    """The machine's ids of the ``count`` visible GPUs (CUDA_VISIBLE_DEVICES order), for lock names."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return visible[:count] if len(visible) >= count else [str(index) for index in range(count)]


class GpuLease:
    """One GPU of this machine held by this process until `release` (or until the process ends: an OS
    file lock, so a killed job frees its GPU). Jobs of a sweep run in parallel (the joblib launcher)
    each take a different GPU; with all taken, a job waits for one."""

    def __init__(self, count: int, lease_dir: Path | None = None) -> None:
        self.count, self.lease_dir = count, lease_dir or gpu_lease_dir()
        self.index: int | None = None
        self._handle: Any = None

    def acquire(self, poll_seconds: float = LEASE_POLL_SECONDS) -> int:
        self.lease_dir.mkdir(parents=True, exist_ok=True)
        ids = physical_gpu_ids(self.count)
        while True:
            for index, gpu in enumerate(ids):
                handle = open(self.lease_dir / f"gpu-{gpu}.lock", "a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                self.index, self._handle = index, handle
                _HELD_GPU[:] = [index]
                return index
            time.sleep(poll_seconds)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file releases its lock
            self._handle, self.index = None, None
            _HELD_GPU.clear()


_HELD_GPU: list[int] = []  # the GPU this process leased for its sweep job, if any


def with_leased_gpu(trainer: dict[str, Any]) -> dict[str, Any]:
    """The run's trainer options on the GPU this job leased (`trainer.devices=[index]`), else unchanged.

    The config itself keeps `devices: 1`: which GPU a job got decides nothing in its results, so a
    resumed job may get another one.
    """
    return dict(trainer, devices=list(_HELD_GPU)) if _HELD_GPU else trainer


def sweep_job_devices(trainer: Mapping[str, Any], launcher_target: str, gpus: int) -> bool:
    """Whether a sweep job should lease one GPU: parallel jobs (joblib) of one GPU each (`trainer.devices=1`)
    on a machine with several. Each then trains on its own GPU instead of all on GPU 0."""
    return (
        "joblib" in launcher_target
        and gpus > 1
        and trainer.get("devices", 1) == 1
        and str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto")
    )
