"""A local folder in the layout of the Hub's GLUE dataset, read by the same `datasets.load_dataset` call.

`data.hub_dataset` names the dataset a run reads with `data.source=hub` (default `nyu-mll/glue`).
A folder in that dataset's own layout stands in for it offline: one folder per task config
holding parquet files named by split (`mnli/validation_matched-00000-of-00001.parquet`), the
Hub's column names and label ids, and a README.md whose YAML header lists the configs, as the
Hub repository's does. `datasets.load_dataset(folder, "mnli", split="validation_matched")` then
reads it exactly as it reads the Hub.

`write_hub_folder` makes such a folder from a classic GLUE folder (the tasks it holds), plus
stand-ins for MNLI, QQP and QNLI, the tasks only the Hub has, built from real GLUE sentence pairs:

- MNLI (premise, hypothesis; entailment / neutral / contradiction): STS-B pairs by score (>= 4:
  entailment, <= 1: contradiction, else neutral), RTE pairs (entailment, or neutral), MRPC pairs
  (equivalent: entailment, else neutral); the matched dev set from the same sources' dev files, the
  mismatched one from SST-2 and CoLA sentences paired with themselves (entailment), a shortened copy
  (neutral), or another sentence (contradiction);
- QQP (question1, question2; duplicate or not): MRPC pairs, and STS-B pairs (>= 4: duplicate, <= 2: not);
- QNLI (question, sentence; entailment or not): a sentence's first half against the whole sentence
  (entailment) or against another sentence (not_entailment).

These labels follow the real annotations where there are some, so a student can learn them, but
they are not the real tasks: the stand-ins exist to test the Hub code path and to measure the
framework at full size (`rows=`), never to report a score.

    python -m kdexp.hub_folder ../shared/glue_data outputs/glue_hub
    python -m kdexp.hub_folder ../shared/glue_data outputs/glue_hub_mnli400k --tasks mnli --rows 400000
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import datasets

from kdexp.data import DataSource, arrow_column, load_split
from kdexp.tasks import TASKS, GlueTask

LOCAL_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")
STANDIN_TASKS = ("mnli", "qqp", "qnli")
Pair = tuple[str, str, int]


def hub_features(task: GlueTask) -> datasets.Features:
    """The Hub's columns for `task`: its text fields, `label` (class label, or float for STS-B), `idx`."""
    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names or ()))
    return datasets.Features(
        {
            **{name: datasets.Value("string") for name in task.text_fields},
            "label": label,
            "idx": datasets.Value("int32"),
        }
    )


def column_values(ds: datasets.Dataset, name: str) -> list:
    """The values of one column, read through Arrow (no Python object per row on the way)."""
    return arrow_column(ds, name).to_pylist()


def _as_hub_split(task: GlueTask, rows: Iterable[Sequence]) -> datasets.Dataset:
    columns: dict[str, list] = {name: [] for name in (*task.text_fields, "label")}
    for row in rows:
        for name, value in zip((*task.text_fields, "label"), row):
            columns[name].append(value)
    columns["idx"] = list(range(len(columns["label"])))
    return datasets.Dataset.from_dict(columns, features=hub_features(task))


def classic_splits(task: GlueTask, glue_dir: Path) -> dict[str, datasets.Dataset]:
    """A task of the classic GLUE folder in the Hub's columns (the labelled splits)."""
    source = DataSource(glue_dir)
    splits = {}
    for split in (task.train_split, *task.eval_splits):
        ds = load_split(task, split, source)
        splits[split] = _as_hub_split(task, zip(*(column_values(ds, name) for name in (*task.text_fields, "label"))))
    return splits


# --------------------------------------------------------------------------- stand-ins from real pairs


def _pairs(glue_dir: Path, task: str, split: str) -> list[tuple[str, str, float]]:
    ds = load_split(TASKS[task], split, DataSource(glue_dir))
    first, second = TASKS[task].text_fields
    return list(
        zip(column_values(ds, first), column_values(ds, second), (float(y) for y in column_values(ds, "label")))
    )


def _sentences(glue_dir: Path, task: str, split: str) -> list[str]:
    ds = load_split(TASKS[task], split, DataSource(glue_dir))
    return [text for name in TASKS[task].text_fields for text in column_values(ds, name) if len(text.split()) >= 4]


def _first_half(sentence: str) -> str:
    words = sentence.split()
    return " ".join(words[: max(2, len(words) // 2)])


def _mnli_pairs(glue_dir: Path, split: str) -> list[Pair]:
    """MNLI labels (0 entailment, 1 neutral, 2 contradiction) from STS-B scores, RTE and MRPC labels."""
    pairs: list[Pair] = []
    for a, b, score in _pairs(glue_dir, "stsb", split):
        pairs.append((a, b, 0 if score >= 4 else 2 if score <= 1 else 1))
    pairs += [(a, b, 0 if y == 0 else 1) for a, b, y in _pairs(glue_dir, "rte", split)]  # RTE: 0 = entailment
    pairs += [(a, b, 0 if y == 1 else 1) for a, b, y in _pairs(glue_dir, "mrpc", split)]  # MRPC: 1 = equivalent
    return pairs


def _mismatched_mnli(glue_dir: Path, rng: random.Random) -> list[Pair]:
    sentences = _sentences(glue_dir, "sst2", "validation") + _sentences(glue_dir, "cola", "validation")
    pairs: list[Pair] = []
    for index, sentence in enumerate(sentences):
        kind = index % 3
        other = sentences[rng.randrange(len(sentences))]
        pairs.append((sentence, sentence if kind == 0 else _first_half(sentence) if kind == 1 else other, kind))
    return pairs


def _qqp_pairs(glue_dir: Path, split: str) -> list[Pair]:
    pairs = [(a, b, int(y)) for a, b, y in _pairs(glue_dir, "mrpc", split)]
    pairs += [
        (a, b, 1 if score >= 4 else 0) for a, b, score in _pairs(glue_dir, "stsb", split) if score >= 4 or score <= 2
    ]
    return pairs


def _qnli_pairs(glue_dir: Path, split: str, rng: random.Random) -> list[Pair]:
    """QNLI labels (0 entailment, 1 not_entailment): a sentence's first half against itself or another."""
    sentences = _sentences(glue_dir, "sst2", "train" if split == "train" else "validation")
    return [
        (_first_half(s), s if i % 2 == 0 else sentences[rng.randrange(len(sentences))], i % 2)
        for i, s in enumerate(sentences)
    ]


def _sized(pairs: list[Pair], rows: int | None, rng: random.Random) -> list[Pair]:
    """`rows` pairs (all of them when None): a seeded shuffle, repeated when more rows are asked for."""
    shuffled = list(pairs)
    rng.shuffle(shuffled)
    if rows is None:
        return shuffled
    return [shuffled[i % len(shuffled)] for i in range(rows)]


def standin_splits(
    task_name: str, glue_dir: Path, rows: int | None = None, seed: int = 0
) -> dict[str, datasets.Dataset]:
    """The stand-in of an MNLI, QQP or QNLI task (see the module docstring); `rows` training rows."""
    task, rng = TASKS[task_name], random.Random(f"{task_name}/{seed}")
    builders: dict[str, Callable[[str], list[Pair]]] = {
        "mnli": lambda split: _mnli_pairs(glue_dir, split),
        "qqp": lambda split: _qqp_pairs(glue_dir, split),
        "qnli": lambda split: _qnli_pairs(glue_dir, split, rng),
    }
    splits = {task.train_split: _as_hub_split(task, _sized(builders[task_name]("train"), rows, rng))}
    for split in task.eval_splits:
        pairs = (
            _mismatched_mnli(glue_dir, rng) if split == "validation_mismatched" else builders[task_name]("validation")
        )
        splits[split] = _as_hub_split(task, _sized(pairs, None, rng))
    return splits


# --------------------------------------------------------------------------- the folder


def write_hub_folder(
    glue_dir: Path,
    out: Path,
    tasks: Sequence[str] = (*LOCAL_TASKS, *STANDIN_TASKS),
    rows: int | None = None,
    seed: int = 0,
) -> Path:
    """Write `tasks` in the Hub's layout under `out` (stand-ins for MNLI, QQP, QNLI with `rows` training rows)."""
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for name in tasks:
        splits = (
            standin_splits(name, glue_dir, rows, seed)
            if name in STANDIN_TASKS
            else classic_splits(TASKS[name], glue_dir)
        )
        for split, ds in splits.items():
            ds.to_parquet(str(out / name / f"{split}-00000-of-00001.parquet"))
        configs.append((name, list(splits)))
    (out / "README.md").write_text(hub_readme(configs, glue_dir, rows, seed))
    return out


def hub_readme(configs: list[tuple[str, list[str]]], glue_dir: Path, rows: int | None, seed: int) -> str:
    lines = ["---", "configs:"]
    for name, splits in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {name}/{split}-*" for split in splits]
    lines += [
        "---",
        "",
        "# GLUE in the layout of the Hub's nyu-mll/glue (written by kdexp.hub_folder)",
        "",
        f"From the classic GLUE folder {glue_dir}; MNLI, QQP and QNLI are stand-ins built from its sentence "
        f"pairs (training rows: {rows or 'all'}, seed {seed}), for testing and measuring only: see "
        "`python -m kdexp.hub_folder --help`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kdexp.hub_folder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("glue_dir", type=Path, help="a classic GLUE folder (e.g. ../shared/glue_data)")
    parser.add_argument("out", type=Path, help="the folder to write (then: data.source=hub data.hub_dataset=<out>)")
    parser.add_argument("--tasks", default=",".join((*LOCAL_TASKS, *STANDIN_TASKS)))
    parser.add_argument("--rows", type=int, default=None, help="training rows of each stand-in (default: all pairs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = write_hub_folder(args.glue_dir.resolve(), args.out, args.tasks.split(","), args.rows, args.seed)
    print(f"wrote {folder}: use data.source=hub data.hub_dataset={folder.resolve()}")


if __name__ == "__main__":
    main()
