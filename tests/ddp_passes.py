"""Every teacher pass a run caches, computed with `--devices N` processes (CPU, gloo); used by tests/test_hardware.py.

    python tests/ddp_passes.py OUT MODEL_DIR MLM_DIR GLUE_DIR CACHE_DIR DEVICES

Global rank 0 writes OUT/passes.pt: the teacher's logits and [CLS] vectors on the training split,
the DBKD decisions on N = 3 queries per row, and the MLM's top-k store. Lightning's launcher starts
the other processes by running this script again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kdexp.data import DataSource, load_task_data
from kdexp.decision.queries import QueryConfig, query_decisions
from kdexp.decision.teacher import DecisionTeacher
from kdexp.hardware import Hardware, HardwareSpec
from kdexp.inference import PassBatching, length_sorted_loader
from kdexp.models import load_tokenizer
from kdexp.smoothing.mlm import load_mlm_teacher
from kdexp.smoothing.store import build_topk_store
from kdexp.tasks import get_task
from kdexp.teacher import Teacher


def main(out: Path, model_dir: str, mlm_dir: str, glue_dir: str, cache_dir: Path, devices: int) -> None:
    hardware = Hardware(HardwareSpec(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto"))
    hardware.launch()
    task = get_task("sst2")
    tokenizer = load_tokenizer(model_dir)
    data = load_task_data(task, DataSource.from_config("local", glue_dir), tokenizer, 32, cache_dir)
    # A small token budget, so that the pass has many batches to share out.
    teacher = Teacher(
        model_dir, "tiny-teacher", task, tokenizer, cache_dir, hardware, eval_batch_size=3, eval_tokens_per_batch=64
    )
    logits = teacher.logits(data, task.train_split)
    cls = teacher.cls_vectors(data, task.train_split, [0, 1])
    decisions = query_decisions(
        DecisionTeacher.from_teacher(teacher, 32),
        data.raw[task.train_split],
        task,
        QueryConfig(num_queries=3),
        cache_dir,
    ).decisions
    lengths = [len(ids) for ids in data.train["input_ids"]]
    loader = length_sorted_loader(data.train, data.pad_token_id, PassBatching(64, 3), hardware=hardware)
    store = build_topk_store(load_mlm_teacher(mlm_dir), loader, lengths, 4, 1.0, hardware)
    if hardware.is_global_zero:
        torch.save({"logits": logits, "cls": cls, "decisions": decisions, **store.tensors()}, out / "passes.pt")


if __name__ == "__main__":
    out_dir, model, mlm, glue, cache, count = sys.argv[1:7]
    main(Path(out_dir), model, mlm, glue, Path(cache), int(count))
