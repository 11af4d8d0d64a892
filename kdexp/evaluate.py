"""`kdexp-eval` scores a saved student; `kdexp-predict` labels texts with it.

    kdexp-eval outputs/runs/<run>                        # the run's task, its dev split
    kdexp-eval <student folder> task=rte split=validation data.glue_dir=../shared/glue_data
    kdexp-eval outputs/runs/<run> file=my_labelled.tsv   # a labelled CSV/TSV/JSONL file
    kdexp-predict outputs/runs/<run> texts.csv --out predictions.jsonl

A run folder brings its task (GLUE or custom), maximum length and student; a bare student
folder (a `save_pretrained` folder) needs `task=`. Files name their columns like the task's
(`sentence`, or `sentence1`/`sentence2`...) or `text` (`text_a`/`text_b` for pairs), and for
scoring a `label` column (ids or the label words).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdexp.errors import KdexpError, ModelError

PAIR_ALIASES = ("text_a", "text_b")


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`key=value` arguments; anything else is refused in one line."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise KdexpError(f"'{item}' is not key=value (e.g. task=rte, split=validation, file=dev.tsv)")
        values[key] = value
    return values


def load_student(path: Path, task_name: str | None) -> tuple[Any, Any, Any, int]:
    """(model, tokenizer, task, max_length) from a run folder or a student folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdexp.tasks import get_task

    results_file = path / "results.json"
    task_cfg = None
    if results_file.exists():
        results = json.loads(results_file.read_text())
        config = results["config"]
        task_cfg = config["task"] if task_name is None else None
        task = get_task(task_name or config["task"]["name"]) if not (task_cfg or {}).get("train_file") else None
        student_dir, max_length = Path(results["student_dir"]), int(config["data"]["max_length"])
        if not student_dir.is_dir():
            student_dir = path / "student"
    else:
        if task_name is None:
            raise KdexpError(f"{path} is a student folder without results.json: give task=<name>")
        task, student_dir, max_length = get_task(task_name), path, 128
    if not (student_dir / "config.json").is_file():
        raise ModelError(f"{student_dir}: no saved student (config.json) there; give a run folder or a student folder.")
    model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    if task is None:  # the run's own data: its classes as the student saved them (id2label)
        assert task_cfg is not None  # only a task read from its own file (task.train_file) is left unnamed
        task = own_task(task_cfg, model.config)
    return model, AutoTokenizer.from_pretrained(student_dir), task, max_length


def own_task(task_cfg: dict[str, Any], model_config: Any) -> Any:
    from kdexp.tasks import custom_task

    regression = bool(task_cfg["regression"])
    labels = None if regression else tuple(model_config.id2label[i] for i in range(model_config.num_labels))
    metric = task_cfg.get("metric") or ("combined_score" if regression else "accuracy")
    return custom_task(
        task_cfg["name"],
        task_cfg["train_file"],
        task_cfg["dev_file"],
        tuple(task_cfg["text_columns"]),
        task_cfg["label_column"],
        labels,
        regression,
        metric,
    )


def rows_of(task: Any, path: Path) -> Any:
    """A labelled file as a split of `task` (columns named like the task's, or text / text_a, text_b)."""
    from kdexp.data import file_split, read_table

    rows = read_table(path)
    header = list(rows[0]) if rows else []
    columns = tuple(task.text_fields)
    if not set(columns) <= set(header):
        columns = ("text",) if len(task.text_fields) == 1 else PAIR_ALIASES
    file_task = replace(
        task, files={"file": str(path)}, text_fields=columns, label_column=task.label_column if task.files else "label"
    )
    dataset = file_split(file_task, "file")
    return (
        dataset.rename_columns(dict(zip(columns, task.text_fields))) if columns != tuple(task.text_fields) else dataset
    )


def score(
    model: Any, tokenizer: Any, task: Any, dataset: Any, max_length: int, batch_size: int = 64
) -> dict[str, float]:
    """The task's metrics of `model` on `dataset` (columns: the task's text fields and `label`)."""
    import torch

    from kdexp.metrics import GlueMetrics

    metrics = GlueMetrics(task)
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            texts = [rows[field] for field in task.text_fields]
            inputs = tokenizer(*texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            dtype = torch.float32 if task.is_regression else torch.long
            metrics.update(model(**inputs).logits.float(), torch.tensor(rows["label"], dtype=dtype))
    return metrics.compute()


def eval_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdexp-eval", description="Score a saved student with its task's metrics.")
    parser.add_argument("path", type=Path, help="a run folder (with results.json) or a student folder")
    parser.add_argument(
        "assignments",
        nargs="*",
        help="task=<name> split=validation file=<labelled file> data.glue_dir=<folder> batch_size=64",
    )
    args = parser.parse_args(argv)
    try:
        options = parse_assignments(args.assignments)
        model, tokenizer, task, max_length = load_student(args.path, options.get("task"))
        if "file" in options:
            dataset, where = rows_of(task, Path(options["file"])), options["file"]
        else:
            from kdexp.data import DataSource, load_split

            split = options.get("split", task.eval_splits[0])
            source = DataSource.from_config("auto", options.get("data.glue_dir"))
            dataset, where = load_split(task, split, source), f"{task.name}/{split}"
        values = score(model, tokenizer, task, dataset, max_length, int(options.get("batch_size", 64)))
    except KdexpError as err:
        sys.exit(f"kdexp-eval: error: {err}")
    print(json.dumps({"data": where, "rows": len(dataset), "metrics": values}, indent=2))


def predict_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdexp-predict", description="Label texts with a saved student.")
    parser.add_argument("path", type=Path, help="a run folder (with results.json) or a student folder")
    parser.add_argument("file", type=Path, help="a CSV/TSV/JSONL file of texts")
    parser.add_argument("assignments", nargs="*", help="task=<name> (for a student folder), batch_size=64")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSONL predictions (default: stdout)")
    args = parser.parse_args(argv)
    try:
        options = parse_assignments(args.assignments)
        model, tokenizer, task, max_length = load_student(args.path, options.get("task"))
        predictions = predict(model, tokenizer, task, args.file, max_length, int(options.get("batch_size", 64)))
    except KdexpError as err:
        sys.exit(f"kdexp-predict: error: {err}")
    lines = "".join(json.dumps(p) + "\n" for p in predictions)
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.write_text(lines)
        print(f"{args.out}: {len(predictions)} predictions")


def predict(model: Any, tokenizer: Any, task: Any, path: Path, max_length: int, batch_size: int = 64) -> list[dict]:
    """One prediction per row: the label and every label's probability (regression: the score)."""
    import torch

    from kdexp.data import read_table

    rows = read_table(path)
    columns = (
        list(task.text_fields)
        if rows and set(task.text_fields) <= set(rows[0])
        else (["text"] if len(task.text_fields) == 1 else list(PAIR_ALIASES))
    )
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise KdexpError(f"{path}: no column {missing}; name the text column(s) {list(task.text_fields)} or {columns}")
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = tokenizer(
                *[[str(r[c]) for r in chunk] for c in columns],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            logits = model(**inputs).logits.float()
            for row, row_logits in zip(chunk, logits):
                predictions.append(_prediction(task, row_logits, {c: row[c] for c in columns}))
    return predictions


def _prediction(task: Any, logits: Any, texts: dict[str, Any]) -> dict[str, Any]:
    if task.is_regression:
        return {**texts, "score": float(logits.reshape(-1)[0])}
    probabilities = logits.softmax(-1).tolist()
    names = list(task.label_names)
    return {**texts, "label": names[int(logits.argmax())], "probabilities": dict(zip(names, probabilities))}
