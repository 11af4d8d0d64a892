"""The framework's own cost at full size: each stage's time and peak memory on an MNLI-sized pair task.

    python -m kdexp.tools.scale_benchmark --rows 50000,100000,400000 --out outputs/bench/scale

For each size, a stand-in MNLI of that many training rows (`kdexp.hub_folder`, real GLUE sentence
pairs from `--glue-dir`) is read through the Hub code, and a tiny random BERT teacher and student
(`kdexp.tiny_models`) make the models' share of the cost negligible, so what is measured is kdexp:

    load          the split through `datasets.load_dataset` from the Hub-layout folder
    fingerprint   the content fingerprint of the split (part of every cache key)
    tokenise      tokenising the split into the cache (cold)
    logits        the teacher's logits on every row (cold)
    queries       DBKD's query stage, N = 10 (EDA copies and the teacher's decisions; cold)
    topk          the text-smoothing top-k store (k = 8: a store of 48 bytes per token; cold)
    epoch         one vanilla_kd training epoch, batch 32, through `kdexp.run.run`
    warm_data     loading and tokenising again from the warm cache

`--task dream` measures the multiple-choice family instead: a stand-in DREAM of that many training
questions (the real release's questions repeated, 3 options each, one sequence per option of up to
256 tokens), a tiny multiple-choice teacher, the same stages but `topk` (multiple choice smooths live):

    python -m kdexp.tools.scale_benchmark --task dream --rows 2000,8000 --out outputs/bench/scale_mc

Each stage runs in a fresh process (its prerequisites come from the cache the earlier stages
filled) and reports its own peak RSS (VmHWM, which starts afresh at `exec`; the parent's size,
which Linux carries into a child's rusage, is not in it). Writes `scale.json` and `scale.md` (seconds, CPU
seconds, peak RSS in MB, and seconds per 1,000 rows to read the scaling) under `--out`. Time it on an
otherwise idle machine: beside other work, torch's thread pools spin while they wait, which inflates
the CPU seconds as well as the wall time (seen here: 6 times for the teacher's logits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("load", "fingerprint", "tokenise", "logits", "queries", "topk", "epoch", "warm_data")
MULTIPLE_CHOICE_STAGES = tuple(stage for stage in STAGES if stage != "topk")  # multiple choice smooths live
TASKS = ("mnli", "dream")
MAX_LENGTHS = {"mnli": 64, "dream": 256}  # tokens per sequence (DREAM: one per option; 77% of its dialogues fit)
MAX_LENGTH = MAX_LENGTHS["mnli"]
DEV_QUESTIONS = 500  # the multiple-choice stand-in's dev split
REPORTED = ("seconds", "cpu_seconds", "peak_rss_mb")  # the lines `key=value` that a stage process prints
QUERY_CHUNK_ROWS_VARIABLE = "KDEXP_BENCH_QUERY_CHUNK_ROWS"  # DBKD's rows per query chunk in the stage processes


def shared_glue_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "shared" / "glue_data"


def shared_mrc_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "shared" / "mrc_data"


# --------------------------------------------------------------------------- the workspace of one size


def task_name(workdir: Path) -> str:
    """The task a workspace was prepared for (`prepare` writes it)."""
    return (workdir / "task.txt").read_text().strip()


def prepare_multiple_choice(workdir: Path, mrc_dir: Path, questions: int) -> None:
    """A DREAM-release folder of `questions` training questions (the release's repeated, one per item) and the
    first `DEV_QUESTIONS` dev ones, and a tiny multiple-choice teacher over their words."""
    import json

    from kdexp.tiny_models import save_tiny_model, vocabulary_of

    folder = workdir / "mrc" / "dream"
    if not (folder / "dev.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        items = {}
        for split in ("train", "dev"):
            release = json.loads((mrc_dir / "dream" / f"{split}.json").read_text(encoding="utf-8"))
            items[split] = [[turns, [question], name] for turns, qs, name in release for question in qs]
        train = [items["train"][i % len(items["train"])] for i in range(questions)]
        (folder / "train.json").write_text(json.dumps(train))
        (folder / "dev.json").write_text(json.dumps(items["dev"][:DEV_QUESTIONS]))
    if not (workdir / "teacher" / "config.json").exists():
        texts = (json.dumps(item) for item in json.loads((folder / "dev.json").read_text()))
        save_tiny_model(
            workdir / "teacher",
            "bert",
            vocabulary_of(texts, 3000),
            head="multiple_choice",
            max_length=MAX_LENGTHS["dream"],
        )


def prepare(workdir: Path, glue_dir: Path, rows: int, task: str = "mnli", mrc_dir: Path | None = None) -> None:
    """The stand-in of `rows` training rows of `task` (MNLI in the Hub layout, or DREAM's release) and the tiny
    teacher (and, for MNLI, MLM) with its tokenizer."""
    from kdexp.hub_folder import write_hub_folder
    from kdexp.tiny_models import save_tiny_model, vocabulary_of

    (workdir / "task.txt").write_text(task)
    if task == "dream":
        prepare_multiple_choice(workdir, mrc_dir or shared_mrc_dir(), rows)
        return
    if not (workdir / "glue_hub" / "README.md").exists():
        write_hub_folder(glue_dir, workdir / "glue_hub", ("mnli",), rows=rows)
    if not (workdir / "teacher" / "config.json").exists():
        texts = (glue_dir / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:20000]
        vocabulary = vocabulary_of((line.split("\t")[0] for line in texts), 3000)
        save_tiny_model(workdir / "teacher", "bert", vocabulary, num_labels=3, max_length=MAX_LENGTH)
        save_tiny_model(workdir / "mlm", "bert", vocabulary, head="masked_lm", max_length=MAX_LENGTH)


def _environment(workdir: Path) -> dict[str, str]:
    return dict(
        os.environ,
        HF_DATASETS_CACHE=str(workdir / "hf-datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        KDEXP_CACHE_DIR=str(workdir / "cache"),
    )


# --------------------------------------------------------------------------- the stages (one per process)


def _task_and_source(workdir: Path) -> tuple[Any, Any]:
    from kdexp.data import DataSource
    from kdexp.tasks import MRC_TASKS, get_task

    if task_name(workdir) == "dream":
        return MRC_TASKS["dream"], DataSource(None, mrc_dir=workdir / "mrc")
    return get_task("mnli"), DataSource(None, str(workdir / "glue_hub"))


def _max_length(workdir: Path) -> int:
    return MAX_LENGTHS[task_name(workdir)]


def _train_split(workdir: Path) -> Any:
    from kdexp.data import load_split

    task, source = _task_and_source(workdir)
    return load_split(task, task.train_split, source)


def _tokenised(workdir: Path) -> Any:
    from kdexp.data import load_task_data
    from kdexp.models import load_tokenizer

    task, source = _task_and_source(workdir)
    return load_task_data(
        task, source, load_tokenizer(str(workdir / "teacher")), _max_length(workdir), workdir / "cache"
    )


def _teacher(workdir: Path) -> Any:
    from kdexp.hardware import Hardware
    from kdexp.models import load_tokenizer
    from kdexp.teacher import Teacher

    task, _ = _task_and_source(workdir)
    return Teacher(
        str(workdir / "teacher"),
        "tiny-teacher",
        task,
        load_tokenizer(str(workdir / "teacher")),
        workdir / "cache",
        Hardware(),
    )


def run_stage(stage: str, workdir: Path) -> None:
    """One stage, timed inside the process (imports excluded); prints `seconds=<s>`, `cpu_seconds=<s>` and
    `peak_rss_mb=<MB>`. The CPU seconds (all of the process's threads) show how many cores a stage kept busy; for
    `epoch` they span the whole `run` call (setup and a 2,000-row evaluation too)."""
    import torch

    from kdexp.data import content_fingerprint
    from kdexp.resident_memory import own_peak_rss_mb

    torch.manual_seed(0)
    if os.environ.get(QUERY_CHUNK_ROWS_VARIABLE):  # a smaller chunk, so that a test sees the plateau at small sizes
        from kdexp.decision import queries

        queries.CHUNK_ROWS = int(os.environ[QUERY_CHUNK_ROWS_VARIABLE])
    task, _ = _task_and_source(workdir)
    inputs: dict[str, Any] = {}
    if stage == "fingerprint":
        inputs["raw"] = _train_split(workdir)
    if stage in ("logits", "queries", "topk"):
        inputs["data"] = _tokenised(workdir)
    started, cpu_started = time.perf_counter(), time.process_time()
    if stage == "load":
        _train_split(workdir)
    elif stage == "fingerprint":
        choices = ("choices",) if "choices" in inputs["raw"].column_names else ()
        content_fingerprint(inputs["raw"], tuple(task.text_fields) + choices + ("label",))
    elif stage in ("tokenise", "warm_data"):
        _tokenised(workdir)
    elif stage == "logits":
        _teacher(workdir).logits(inputs["data"], task.train_split)
    elif stage == "queries":
        _queries(workdir, inputs["data"])
    elif stage == "topk":
        _topk(workdir, inputs["data"])
    if stage == "epoch":
        seconds = _epoch(workdir)
    else:
        seconds = time.perf_counter() - started
    print(f"seconds={seconds}")
    print(f"cpu_seconds={time.process_time() - cpu_started}")
    print(f"peak_rss_mb={own_peak_rss_mb()}")


def _queries(workdir: Path, data: Any) -> None:
    from kdexp.decision.queries import QueryConfig, query_decisions
    from kdexp.decision.teacher import DecisionTeacher

    task = data.task
    query_decisions(
        DecisionTeacher.from_teacher(_teacher(workdir), _max_length(workdir)),
        data.raw[task.train_split],
        task,
        QueryConfig(num_queries=10),
        workdir / "cache",
    )


def _topk(workdir: Path, data: Any) -> None:
    from kdexp.data import row_lengths
    from kdexp.inference import PassBatching, length_sorted_loader
    from kdexp.smoothing.mlm import load_mlm_teacher
    from kdexp.smoothing.store import build_topk_store

    loader = length_sorted_loader(data.train, data.pad_token_id, PassBatching())
    build_topk_store(load_mlm_teacher(str(workdir / "mlm")), loader, row_lengths(data.train).tolist(), 8)


def _epoch(workdir: Path) -> float:
    from kdexp.run import compose_config, run

    data = (
        ["task=dream", f"data.mrc_dir={workdir / 'mrc'}"]
        if task_name(workdir) == "dream"
        else ["task=mnli", "data.source=hub", f"data.hub_dataset={workdir / 'glue_hub'}"]
    )
    cfg = compose_config(
        [
            *data,
            "method=vanilla_kd",
            f"teacher.name_or_path={workdir / 'teacher'}",
            "teacher.finetuned=true",
            "student=first_layers",
            "student.num_layers=2",
            f"data.max_length={_max_length(workdir)}",
            "data.max_eval_samples=2000",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"cache_dir={workdir / 'cache'}",
        ]
    )
    return float(run(cfg, workdir / "run", overrides=[])["train_seconds"])


# --------------------------------------------------------------------------- measuring


def measure_stage(stage: str, workdir: Path) -> dict[str, float]:
    """Run `stage` in a fresh process: its seconds and its own peak RSS, as the stage reports them."""
    out_file, err_file = workdir / f"{stage}.out", workdir / f"{stage}.err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "kdexp.tools.scale_benchmark", "--stage", stage, "--workdir", str(workdir)],
            env=_environment(workdir),
            stdout=out,
            stderr=err,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{err_file.read_text()[-3000:]}")
    lines = out_file.read_text().splitlines()
    reported = {key: line.split("=", 1)[1] for line in lines for key in REPORTED if line.startswith(key + "=")}
    return {key: float(reported[key]) for key in REPORTED}


def measure_size(
    rows: int,
    root: Path,
    glue_dir: Path,
    stages: tuple[str, ...] = STAGES,
    task: str = "mnli",
    mrc_dir: Path | None = None,
) -> dict[str, Any]:
    workdir = root / f"{task}-rows-{rows}"
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir, glue_dir, rows, task, mrc_dir)
    return {stage: measure_stage(stage, workdir) for stage in stages}


def markdown(results: dict[int, dict[str, dict[str, float]]]) -> str:
    sizes = sorted(results)
    header = "| stage | " + " | ".join(f"{n:,} rows: s / CPU s / peak RSS MB / s per 1k rows" for n in sizes) + " |"
    lines = [header, "|" + "---|" * (len(sizes) + 1)]
    for stage in STAGES:
        if stage not in results[sizes[0]]:
            continue
        cells = [
            f"{results[n][stage]['seconds']:.1f} / {results[n][stage]['cpu_seconds']:.1f} / "
            f"{results[n][stage]['peak_rss_mb']:.0f} / {1000 * results[n][stage]['seconds'] / n:.3f}"
            for n in sizes
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kdexp.tools.scale_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", default="50000,100000,400000", help="training rows, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/scale"))
    parser.add_argument("--glue-dir", type=Path, default=Path(os.environ.get("GLUE_DIR") or shared_glue_dir()))
    parser.add_argument("--task", choices=TASKS, default="mnli", help="mnli (pairs) or dream (multiple choice)")
    parser.add_argument("--mrc-dir", type=Path, default=Path(os.environ.get("MRC_DIR") or shared_mrc_dir()))
    parser.add_argument("--stages", default=None, help="comma-separated (default: every stage of the task)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # one stage, in its own process (see measure_stage)
        run_stage(args.stage, args.workdir)
        return
    import torch

    results = {}
    default_stages = MULTIPLE_CHOICE_STAGES if args.task == "dream" else STAGES
    stages = tuple(args.stages.split(",")) if args.stages else default_stages
    for rows in (int(n) for n in args.rows.split(",")):
        results[rows] = measure_size(
            rows, args.out / "work", args.glue_dir.resolve(), stages, args.task, args.mrc_dir.resolve()
        )
        print(
            f"{rows} rows: "
            + ", ".join(f"{s} {v['seconds']:.1f}s {v['peak_rss_mb']:.0f}MB" for s, v in results[rows].items()),
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"task": args.task, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "results": results}
    (args.out / "scale.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "scale.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
