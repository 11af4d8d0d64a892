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


@dataclass(frozen=True)
class GlueTask:
    name: str
    hub_config: str
    text_fields: tuple[str, ...]  # Hub column names, one or two sentences
    label_names: tuple[str, ...] | None  # None for regression
    main_metric: str
    metrics: tuple[str, ...]
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    local_dir: str = ""
    local_layouts: dict[str, TsvLayout] = field(default_factory=dict)
    # TSV label strings when they are words rather than the label ids themselves.
    local_label_values: tuple[str, ...] | None = None
    # A user's own data (task=custom): split -> CSV/TSV/JSONL file, and the label column in it.
    files: dict[str, str] = field(default_factory=dict)
    label_column: str = "label"
    allow_empty_text: bool = False  # own files: keep rows whose text is empty (else refused with file:line)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


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
            "validation_mismatched": TsvLayout(
                "dev_mismatched.tsv", ("sentence1", "sentence2"), "gold_label"
            ),
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


CUSTOM_METRICS = {
    False: ("accuracy", "f1", "matthews_correlation"),  # classification (f1: two classes only)
    True: ("pearson", "spearman", "combined_score"),  # regression
}


def custom_task(name: str, train_file: str, dev_file: str, text_columns: tuple[str, ...], label_column: str,
                labels: tuple[str, ...] | None, regression: bool, metric: str, allow_empty_text: bool = False) -> GlueTask:
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
            f"Unknown GLUE task '{name}' (config key task.name). "
            f"Known tasks: {', '.join(sorted(TASKS))}."
        ) from None
