"""The GLUE task registry: columns, label sets, metrics and file layouts per task.

Label order follows the Hugging Face `nyu-mll/glue` dataset, so that label ids from the
Hub and from the classic TSV files mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TsvLayout:
    """Where the fields of one classic GLUE TSV file live.

    Columns are given by header name, or by position when the file has no header.
    """

    file: str
    text_columns: tuple[str | int, ...]
    label_column: str | int | None
    has_header: bool = True
    extra_files: tuple[str, ...] = ()  # more files with the same layout, concatenated


# Task families (kdexp.families): what a row is, and what a model outputs for it.
CLASSIFICATION = "classification"  # a text or a text pair -> one label (or a score: regression)
MULTIPLE_CHOICE = "multiple_choice"  # a passage, a question and C options -> one of the options
EXTRACTIVE_QA = "extractive_qa"  # a question and a passage -> a span of the passage (or none: SQuAD 2.0)
FAMILIES = (CLASSIFICATION, MULTIPLE_CHOICE, EXTRACTIVE_QA)


@dataclass(frozen=True)
class GlueTask:
    """A task: a family, its columns, labels and metrics, and where its data is (Hub and local files)."""

    name: str
    hub_config: str
    text_fields: tuple[str, ...]  # column names: the sentence(s); MC: passage and question; QA: question and passage
    label_names: tuple[str, ...] | None  # None for regression (and extractive QA); MC: one name per option
    main_metric: str
    metrics: tuple[str, ...]
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    local_dir: str = ""
    local_layouts: dict[str, TsvLayout] = field(default_factory=dict)
    # TSV label strings when they are words rather than the label ids themselves.
    local_label_values: tuple[str, ...] | None = None
    # A user's own data (task=custom, or task.train_file/dev_file of an MRC task): split -> file, label column.
    files: dict[str, str] = field(default_factory=dict)
    label_column: str = "label"
    allow_empty_text: bool = False  # own files: keep rows whose text is empty (else refused with file:line)
    family: str = CLASSIFICATION
    hub_dataset: str | None = None  # MRC tasks: their own Hub dataset (GLUE tasks: data.hub_dataset)
    hub_revision: str | None = None  # the revision of hub_dataset to read (None: its main branch)
    local_files: dict[str, str] = field(default_factory=dict)  # MRC tasks: split -> file under MRC_DIR/<local_dir>
    with_no_answer: bool = False  # extractive QA: some questions have no answer in the passage (SQuAD 2.0)
    dev_articles: tuple[str, ...] = ()  # extractive QA from one file: the articles (titles) that are the dev split

    @property
    def is_regression(self) -> bool:
        return self.family == CLASSIFICATION and self.label_names is None

    @property
    def num_labels(self) -> int:
        """Classes, options (multiple choice), or 2 for extractive QA (its start and end distributions)."""
        if self.family == EXTRACTIVE_QA:
            return 2
        return 1 if self.label_names is None else len(self.label_names)

    def output_shape(self, max_length: int) -> tuple[int, ...]:
        """The shape of a model's output for one row: ``(C,)``, or ``(2, max_length)`` for extractive QA
        (start and end logits over the row's tokens)."""
        return (2, max_length) if self.family == EXTRACTIVE_QA else (self.num_labels,)


def _binary(pos: str = "1", neg: str = "0") -> tuple[str, str]:
    return (neg, pos)


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        name="cola",
        hub_config="cola",
        text_fields=("sentence",),
        label_names=("unacceptable", "acceptable"),
        main_metric="matthews_correlation",
        metrics=("matthews_correlation",),
        local_dir="CoLA",
        local_layouts={
            "train": TsvLayout("train.tsv", (3,), 1, has_header=False),
            "validation": TsvLayout("dev.tsv", (3,), 1, has_header=False),
        },
        local_label_values=_binary(),
    ),
    "sst2": GlueTask(
        name="sst2",
        hub_config="sst2",
        text_fields=("sentence",),
        label_names=("negative", "positive"),
        main_metric="accuracy",
        metrics=("accuracy",),
        local_dir="SST-2",
        local_layouts={
            "train": TsvLayout("train.tsv", ("sentence",), "label"),
            "validation": TsvLayout("dev.tsv", ("sentence",), "label"),
            "test": TsvLayout("test.tsv", ("sentence",), None),
        },
        local_label_values=_binary(),
    ),
    "mrpc": GlueTask(
        name="mrpc",
        hub_config="mrpc",
        text_fields=("sentence1", "sentence2"),
        label_names=("not_equivalent", "equivalent"),
        main_metric="combined_score",
        metrics=("accuracy", "f1", "combined_score"),
        local_dir="MRPC",
        local_layouts={
            "train": TsvLayout("train.tsv", ("#1 String", "#2 String"), "Quality"),
            "validation": TsvLayout("dev.tsv", ("#1 String", "#2 String"), "Quality"),
            "test": TsvLayout("test.tsv", ("#1 String", "#2 String"), None),
        },
        local_label_values=_binary(),
    ),
    "stsb": GlueTask(
        name="stsb",
        hub_config="stsb",
        text_fields=("sentence1", "sentence2"),
        label_names=None,
        main_metric="combined_score",
        metrics=("pearson", "spearman", "combined_score"),
        local_dir="STS-B",
        local_layouts={
            "train": TsvLayout("train.tsv", ("sentence1", "sentence2"), "score"),
            "validation": TsvLayout("dev.tsv", ("sentence1", "sentence2"), "score"),
            "test": TsvLayout("test.tsv", ("sentence1", "sentence2"), None),
        },
    ),
    "qqp": GlueTask(
        name="qqp",
        hub_config="qqp",
        text_fields=("question1", "question2"),
        label_names=("not_duplicate", "duplicate"),
        main_metric="combined_score",
        metrics=("accuracy", "f1", "combined_score"),
        local_dir="QQP",
        local_layouts={
            "train": TsvLayout("train.tsv", ("question1", "question2"), "is_duplicate"),
            "validation": TsvLayout("dev.tsv", ("question1", "question2"), "is_duplicate"),
        },
        local_label_values=_binary(),
    ),
    "mnli": GlueTask(
        name="mnli",
        hub_config="mnli",
        text_fields=("premise", "hypothesis"),
        label_names=("entailment", "neutral", "contradiction"),
        main_metric="accuracy",
        metrics=("accuracy",),
        eval_splits=("validation_matched", "validation_mismatched"),
        local_dir="MNLI",
        local_layouts={
            "train": TsvLayout("train.tsv", ("sentence1", "sentence2"), "gold_label"),
            "validation_matched": TsvLayout("dev_matched.tsv", ("sentence1", "sentence2"), "gold_label"),
            "validation_mismatched": TsvLayout("dev_mismatched.tsv", ("sentence1", "sentence2"), "gold_label"),
        },
        local_label_values=("entailment", "neutral", "contradiction"),
    ),
    "qnli": GlueTask(
        name="qnli",
        hub_config="qnli",
        text_fields=("question", "sentence"),
        label_names=("entailment", "not_entailment"),
        main_metric="accuracy",
        metrics=("accuracy",),
        local_dir="QNLI",
        local_layouts={
            "train": TsvLayout("train.tsv", ("question", "sentence"), "label"),
            "validation": TsvLayout("dev.tsv", ("question", "sentence"), "label"),
        },
        local_label_values=("entailment", "not_entailment"),
    ),
    "rte": GlueTask(
        name="rte",
        hub_config="rte",
        text_fields=("sentence1", "sentence2"),
        label_names=("entailment", "not_entailment"),
        main_metric="accuracy",
        metrics=("accuracy",),
        local_dir="RTE",
        local_layouts={
            "train": TsvLayout("train.tsv", ("sentence1", "sentence2"), "label"),
            "validation": TsvLayout("dev.tsv", ("sentence1", "sentence2"), "label"),
            "test": TsvLayout("test.tsv", ("sentence1", "sentence2"), None),
        },
        local_label_values=("entailment", "not_entailment"),
    ),
    "wnli": GlueTask(
        name="wnli",
        hub_config="wnli",
        text_fields=("sentence1", "sentence2"),
        label_names=("not_entailment", "entailment"),
        main_metric="accuracy",
        metrics=("accuracy",),
        local_dir="WNLI",
        local_layouts={
            "train": TsvLayout("train.tsv", ("sentence1", "sentence2"), "label"),
            "validation": TsvLayout("dev.tsv", ("sentence1", "sentence2"), "label"),
            "test": TsvLayout("test.tsv", ("sentence1", "sentence2"), None),
        },
        local_label_values=_binary(),
    ),
}


OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the labels of multiple-choice options, in order


def option_letters(count: int) -> tuple[str, ...]:
    return tuple(OPTION_LETTERS[:count])


# Machine reading comprehension: DREAM and RACE (multiple choice), SQuAD v1.1 and v2.0 (extractive QA).
# Local files (MRC_DIR / data.mrc_dir) are the official releases' formats; the Hub datasets are named.
MRC_TASKS: dict[str, GlueTask] = {
    "dream": GlueTask(
        name="dream",
        hub_config="",
        text_fields=("context", "question"),
        label_names=option_letters(3),
        main_metric="accuracy",
        metrics=("accuracy",),
        family=MULTIPLE_CHOICE,
        # The main branch holds only a loading script, which datasets >= 4 no longer runs; the Hub's Parquet
        # export of it is read instead.
        hub_dataset="dataset-org/dream",
        hub_revision="refs/convert/parquet",
        local_dir="dream",
        local_files={"train": "train.json", "validation": "dev.json", "test": "test.json"},
    ),
    "race": GlueTask(
        name="race",
        hub_config="all",
        text_fields=("context", "question"),
        label_names=option_letters(4),
        main_metric="accuracy",
        metrics=("accuracy",),
        family=MULTIPLE_CHOICE,
        hub_dataset="ehovy/race",
        local_dir="race",
        local_files={"train": "train", "validation": "dev", "test": "test"},
    ),
    "squad": GlueTask(
        name="squad",
        hub_config="",
        text_fields=("question", "context"),
        label_names=None,
        main_metric="f1",
        metrics=("exact_match", "f1"),
        family=EXTRACTIVE_QA,
        hub_dataset="rajpurkar/squad",
        local_dir="squad",
        local_files={"train": "train-v1.1.json", "validation": "dev-v1.1.json"},
    ),
    "squad_v2": GlueTask(
        name="squad_v2",
        hub_config="",
        text_fields=("question", "context"),
        label_names=None,
        main_metric="f1",
        metrics=("exact_match", "f1"),
        family=EXTRACTIVE_QA,
        hub_dataset="rajpurkar/squad_v2",
        local_dir="squad_v2",
        local_files={"train": "train-v2.0.json", "validation": "dev-v2.0.json"},
        with_no_answer=True,
    ),
}
TASKS.update(MRC_TASKS)


CUSTOM_METRICS = {
    False: ("accuracy", "f1", "matthews_correlation"),  # classification (f1: two classes only)
    True: ("pearson", "spearman", "combined_score"),  # regression
}


def custom_task(
    name: str,
    train_file: str,
    dev_file: str,
    text_columns: tuple[str, ...],
    label_column: str,
    labels: tuple[str, ...] | None,
    regression: bool,
    metric: str,
    allow_empty_text: bool = False,
) -> GlueTask:
    """A task on the user's own files. `labels`: the classes as the label column writes them (their
    order gives the ids); None for regression. `metric`: the main metric (accuracy is always reported).
    `allow_empty_text`: keep rows with an empty text (counted in the log) instead of refusing them."""
    if regression:
        metrics: tuple[str, ...] = ("pearson", "spearman", "combined_score")
    else:
        metrics = ("accuracy",) + ((metric,) if metric != "accuracy" else ())
    return GlueTask(
        name=name,
        hub_config="",
        text_fields=tuple(text_columns),
        label_names=None if regression else tuple(labels or ()),
        main_metric=metric,
        metrics=metrics,
        local_label_values=None if regression else tuple(labels or ()),
        files={"train": train_file, "validation": dev_file},
        label_column=label_column,
        allow_empty_text=allow_empty_text,
    )


def get_task(name: str) -> GlueTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"Unknown GLUE task '{name}' (config key task.name). Known tasks: {', '.join(sorted(TASKS))}."
        ) from None
