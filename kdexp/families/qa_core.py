"""Extractive question answering (SQuAD 1.1 and 2.0): reading, windowing, span decoding and scoring.

A row is a `question`, a passage (`context`) and its gold `answers` (``{"text": [...], "answer_start":
[...]}``, character offsets into the passage), with `id` and the article's `title`: the columns and
features of the Hub's `rajpurkar/squad` and `rajpurkar/squad_v2`. An unanswerable question (SQuAD 2.0)
has empty answer lists.

- Windowing (Hugging Face's run_qa): a passage longer than the model's input is cut into windows that
  overlap by `doc_stride` tokens, each window a feature ``[CLS] question [SEP] passage-part [SEP]``;
  token 0 ([CLS]) is the no-answer position, and a window that does not hold the whole answer is
  labelled with it.
- Decoding: the best valid span over all of an example's windows, by start + end logit; with SQuAD 2.0,
  no answer when the null score (start + end logit of token 0) beats it by more than a threshold.
- Scoring: the official SQuAD evaluation scripts' exact match and token F1 (their normalisation: lower
  case, no punctuation, no articles, single spaces), the max over the gold answers, in percent. The two
  scripts differ only on texts that normalise to nothing (such as "The"): v2.0 drops such gold answers
  and scores an empty prediction against an empty gold F1 1; v1.1 keeps them and scores that F1 0.

Pure functions: no Lightning, nothing of kdexp but its errors.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from kdexp.errors import ConfigError, DataError

NO_ANSWER_INDEX = 0  # the first token ([CLS], <s>): where start and end point when there is no answer
SQUAD_LAYOUT = (
    '{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
    '"answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}'
)


def squad_features() -> datasets.Features:
    """The Hub's squad / squad_v2 features."""
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
        }
    )


# --------------------------------------------------------------------------- scoring (official SQuAD v2.0 script)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """`text` lower-cased, without punctuation and articles (a, an, the), words separated by one space."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, version_2: bool = True) -> float:
    """Token-level F1 of the normalised texts; when both are empty 1.0 (v2.0 script) or 0.0 (v1.1 script),
    0.0 when only one is."""
    predicted, expected = _answer_tokens(prediction), _answer_tokens(gold)
    if not predicted or not expected:
        return float(version_2 and predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def _gold_answers(references: Sequence[str], version_2: bool = True) -> list[str]:
    """The official scripts' gold texts: v2.0 keeps the references that do not normalise to nothing, or [""]
    (no answer); v1.1 keeps them all."""
    if not version_2:
        return list(references)
    return [text for text in references if normalize_answer(text)] or [""]


def squad_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], version_2: bool = True
) -> dict[str, float]:
    """Exact match and F1 in percent over the referenced questions (the max over each one's gold answers), as the
    official SQuAD v2.0 script prints them (`version_2=False`: the v1.1 script, for SQuAD 1.1's answerable
    questions).

    An empty reference list is an unanswerable question, matched only by a prediction that normalises to "".
    When some question is unanswerable, also `HasAns_total` and `NoAns_total` and, for each non-empty group,
    `HasAns_exact_match`, `HasAns_f1`, `NoAns_exact_match`, `NoAns_f1`. Predictions for questions without a
    reference are ignored; a referenced question without a prediction is an error.
    """
    if not references:
        raise DataError("squad_metrics: no reference answers; give each question id its list of gold texts.")
    missing = [question for question in references if question not in predictions]
    if missing:
        raise DataError(
            f"squad_metrics: no prediction for {len(missing)} of {len(references)} questions (first: "
            f'{missing[0]!r}); predict every question, "" for no answer.'
        )
    exact, f1, answerable = {}, {}, {}
    for question, texts in references.items():
        if isinstance(texts, str):
            raise DataError(
                f"squad_metrics: the references of {question!r} are one string ({texts!r}); give a list "
                "of gold texts ([] when unanswerable)."
            )
        gold = _gold_answers(texts, version_2)
        exact[question] = max(exact_match_score(predictions[question], text) for text in gold)
        f1[question] = max(f1_score(predictions[question], text, version_2) for text in gold)
        answerable[question] = len(texts) > 0
    metrics = _percentages(list(references), exact, f1, prefix="")
    if not all(answerable.values()):
        for prefix, has_answer in (("HasAns_", True), ("NoAns_", False)):
            group = [question for question in references if answerable[question] == has_answer]
            metrics[f"{prefix}total"] = float(len(group))
            if group:
                metrics.update(_percentages(group, exact, f1, prefix))
    return metrics


def _percentages(
    questions: list[str], exact: Mapping[str, float], f1: Mapping[str, float], prefix: str
) -> dict[str, float]:
    return {
        f"{prefix}exact_match": 100.0 * sum(exact[q] for q in questions) / len(questions),
        f"{prefix}f1": 100.0 * sum(f1[q] for q in questions) / len(questions),
    }


# --------------------------------------------------------------------------- reading


def read_squad_json(path: str | Path) -> datasets.Dataset:
    """The official SQuAD JSON (v1.1 or v2.0) as the Hub's columns: id, title, context, question, answers.

    `is_impossible` questions get empty answer lists (their `plausible_answers` are not answers).
    """
    path = Path(path)
    document = _load_json(path)
    rows = list(_squad_rows(document, path))
    duplicated = [question for question, count in Counter(row["id"] for row in rows).items() if count > 1]
    if duplicated:
        raise DataError(
            f"{path}: the question id {duplicated[0]!r} is used more than once; give each question its own id."
        )
    return datasets.Dataset.from_list(rows, features=squad_features())


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}).") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}).") from None


def _field(node: Any, key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    """`node[key]`, checked to be a `kind`; a DataError naming the file and the place otherwise."""
    if not isinstance(node, Mapping) or key not in node:
        raise DataError(f"{path}: {where} has no {key!r}; the SQuAD layout is {SQUAD_LAYOUT}.")
    value = node[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(
            f"{path}: {where}.{key} is {type(value).__name__} {value!r:.60}, not {names}; the SQuAD "
            f"layout is {SQUAD_LAYOUT}."
        )
    return value


def _squad_rows(document: Any, path: Path):
    """One row per question, in file order."""
    for article_no, article in enumerate(_field(document, "data", list, "the file", path)):
        where = f"data[{article_no}]"
        title = _field(article, "title", str, where, path)
        for paragraph_no, paragraph in enumerate(_field(article, "paragraphs", list, where, path)):
            where = f"data[{article_no}].paragraphs[{paragraph_no}]"
            context = _field(paragraph, "context", str, where, path)
            for question_no, qa in enumerate(_field(paragraph, "qas", list, where, path)):
                where = f"data[{article_no}].paragraphs[{paragraph_no}].qas[{question_no}]"
                yield {
                    "id": str(_field(qa, "id", (str, int), where, path)),
                    "title": title,
                    "context": context,
                    "question": _field(qa, "question", str, where, path),
                    "answers": _answers(qa, where, path),
                }


def _answers(qa: Mapping[str, Any], where: str, path: Path) -> dict[str, list]:
    if qa.get("is_impossible", False) is True:
        return {"text": [], "answer_start": []}
    answers = _field(qa, "answers", list, where, path)
    return {
        "text": [_field(a, "text", str, f"{where}.answers[{i}]", path) for i, a in enumerate(answers)],
        "answer_start": [_field(a, "answer_start", int, f"{where}.answers[{i}]", path) for i, a in enumerate(answers)],
    }


def split_by_article(ds: datasets.Dataset, dev_articles: Sequence[str]) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rows of the other articles, rows of `dev_articles`), by the `title` column, each in the order of `ds`."""
    wanted = {dev_articles} if isinstance(dev_articles, str) else set(dev_articles)
    titles = ds.select_columns(["title"]).with_format("arrow")[:]["title"].to_pylist()  # no Python row each
    known = dict.fromkeys(titles)
    unknown = sorted(wanted - known.keys())
    if not wanted or unknown:
        raise DataError(
            f"split_by_article: no article titled {unknown[0] if unknown else '(none given)'!r}; the "
            f"titles are {', '.join(known)}."
        )
    dev_rows = [row for row, title in enumerate(titles) if title in wanted]
    train_rows = [row for row, title in enumerate(titles) if title not in wanted]
    if not train_rows:
        raise DataError(
            "split_by_article: every article is a dev article, which leaves no training rows; keep at "
            "least one article out of dev_articles."
        )
    return ds.select(train_rows), ds.select(dev_rows)


# --------------------------------------------------------------------------- windowing (model inputs)


def qa_features(
    examples: Mapping[str, list], tokenizer: Any, max_length: int, doc_stride: int, with_positions: bool
) -> dict[str, list]:
    """Model inputs of a batch of rows: each (question, passage) cut into windows of at most `max_length` tokens,
    consecutive windows of a passage sharing `doc_stride` passage tokens. Rows are not padded.

    Per window (feature), beside the tokenizer's inputs:
    - `example_index`: the row of `examples` it came from (and `example_id`, that row's `id`, when rows have ids:
      with ``Dataset.map(batched=True)`` the index counts within the batch, the id does not);
    - `offset_mapping`: each passage token's ``[start, end)`` characters in the passage, None for other tokens;
    - `context_mask`: 1 where a start or end may point (passage tokens and token 0, the no-answer position);
    - with `with_positions`: `start_positions`, `end_positions`, the first and last tokens of the first gold
      answer, or 0 when the window does not hold the whole answer or the question is unanswerable.

    A tokenizer that pads on the left gets the passage first and the question second, as in run_qa.
    """
    _check_fast(tokenizer)
    # run_qa: leading spaces of a question (some SQuAD questions have many) would only take room in the window.
    questions = [question.lstrip() for question in examples["question"]]
    contexts = list(examples["context"])
    if not questions:
        return {name: [] for name in _feature_names(tokenizer, examples, with_positions)}
    _check_window_room(tokenizer, questions, max_length, doc_stride)
    question_first = tokenizer.padding_side != "left"
    try:
        encoded = tokenizer(
            questions if question_first else contexts,
            contexts if question_first else questions,
            truncation="only_second" if question_first else "only_first",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
    except Exception as err:  # the tokenizers library's own truncation errors
        raise ConfigError(
            f"qa_features: the tokenizer cannot cut these rows into windows of max_length={max_length} "
            f"with doc_stride={doc_stride} ({err}); raise data.max_length or lower task.doc_stride."
        ) from None
    passage_sequence = 1 if question_first else 0
    example_index = list(encoded["overflow_to_sample_mapping"])
    features = {
        name: list(values)
        for name, values in encoded.items()
        if name not in ("offset_mapping", "overflow_to_sample_mapping")
    }
    features["example_index"] = example_index
    if "id" in examples:
        ids = list(examples["id"])
        features["example_id"] = [ids[row] for row in example_index]
    features["offset_mapping"], features["context_mask"] = [], []
    for feature, offsets in enumerate(encoded["offset_mapping"]):
        sequence_ids = encoded.sequence_ids(feature)
        if sequence_ids[NO_ANSWER_INDEX] is not None:
            raise ConfigError(
                f"qa_features: the tokenizer {type(tokenizer).__name__} does not start a "
                "question-passage pair with a special token ([CLS], <s>), where token 0 is the "
                "no-answer position; use a BERT-, RoBERTa-, ELECTRA- or DistilBERT-style tokenizer."
            )
        passage_offsets = [
            list(offset) if sequence == passage_sequence else None for offset, sequence in zip(offsets, sequence_ids)
        ]
        features["offset_mapping"].append(passage_offsets)
        features["context_mask"].append(
            [int(offset is not None or token == NO_ANSWER_INDEX) for token, offset in enumerate(passage_offsets)]
        )
    if with_positions:
        answers = list(examples["answers"])
        positions = [
            _answer_token_span(offsets, _first_answer_characters(answers[row]))
            for offsets, row in zip(features["offset_mapping"], example_index)
        ]
        features["start_positions"] = [start for start, _ in positions]
        features["end_positions"] = [end for _, end in positions]
    return features


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"qa_features: {type(tokenizer).__name__} is not a fast tokenizer, which gives the "
            "character offsets that map an answer to tokens; load one with AutoTokenizer."
        )


def _check_window_room(tokenizer: Any, questions: list[str], max_length: int, doc_stride: int) -> None:
    """The tokenizers library fails (or panics) when a window has no more passage tokens than the stride."""
    if doc_stride < 0:
        raise ConfigError(f"qa_features: doc_stride={doc_stride} is negative; give the overlap in tokens (>= 0).")
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    longest = int(np.argmax(lengths))
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - lengths[longest]
    if room <= doc_stride:
        raise ConfigError(
            f"qa_features: max_length={max_length} leaves {room} passage tokens per window beside the "
            f"question {questions[longest]!r:.80} ({lengths[longest]} tokens), which must be more than "
            f"doc_stride={doc_stride}; raise data.max_length or lower task.doc_stride."
        )


def _feature_names(tokenizer: Any, examples: Mapping[str, list], with_positions: bool) -> list[str]:
    names = [*tokenizer.model_input_names, "example_index", "offset_mapping", "context_mask"]
    names += ["example_id"] if "id" in examples else []
    return names + (["start_positions", "end_positions"] if with_positions else [])


def _first_answer_characters(answers: Mapping[str, list]) -> tuple[int, int] | None:
    """``[start, end)`` characters of the first gold answer; None when the question is unanswerable."""
    if not answers["text"]:
        return None
    start = int(answers["answer_start"][0])
    return start, start + len(answers["text"][0])


def _answer_token_span(offsets: list[list[int] | None], characters: tuple[int, int] | None) -> tuple[int, int]:
    """The first and last passage tokens of the answer characters in this window; the no-answer position twice
    when the window does not hold all of them."""
    passage = [(token, offset) for token, offset in enumerate(offsets) if offset is not None]
    if characters is None or not passage:
        return NO_ANSWER_INDEX, NO_ANSWER_INDEX
    first_char, end_char = characters
    if passage[0][1][0] > first_char or passage[-1][1][1] < end_char:
        return NO_ANSWER_INDEX, NO_ANSWER_INDEX
    start = max(token for token, (first, _) in passage if first <= first_char)
    end = min(token for token, (_, stop) in passage if stop >= end_char)
    return (start, end) if start <= end else (NO_ANSWER_INDEX, NO_ANSWER_INDEX)


# --------------------------------------------------------------------------- decoding


def postprocess_predictions(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """The predicted answer text of each example (by its `id`): the passage characters of the best valid span
    over all its features, by start logit + end logit.

    A valid span starts and ends on passage tokens, start <= end, at most `max_answer_length` tokens. With
    `version_2_with_negative`, the prediction is "" when the null score (start + end logit of token 0, the least
    over the example's features) exceeds the best span's score by more than `null_score_diff_threshold`.

    `examples` and `features` are Datasets or mappings of columns (features from `qa_features`); the logits are
    one row per feature (numpy or torch, 2-D or a list of rows), positions past a feature's length ignored. The
    search is exhaustive, so `n_best_size` (run_qa's cap on the start and end candidates it pairs, kept for its
    signature) never changes the result: run_qa's n_best_size x n_best_size candidates are a subset of the spans
    searched here.
    """
    spans = best_spans(examples, features, start_logits, end_logits, n_best_size, max_answer_length)
    return answers_of(spans, version_2_with_negative, null_score_diff_threshold)


def answers_of(
    spans: Mapping[str, tuple[str, float]], version_2_with_negative: bool, null_score_diff_threshold: float = 0.0
) -> dict[str, str]:
    """The answer of each question from its best span and null margin (`best_spans`): the span, or "" (SQuAD 2.0)
    where the margin exceeds the threshold."""
    return {
        question: "" if version_2_with_negative and null_margin > null_score_diff_threshold else text
        for question, (text, null_margin) in spans.items()
    }


def best_spans(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, tuple[str, float]]:
    """Each example's best span text over its features and its null margin: the null score minus the span's
    (+inf when no feature has a valid span). `postprocess_predictions` answers "" where the margin exceeds its
    threshold; `best_threshold_metrics` searches that threshold."""
    if n_best_size < 1 or max_answer_length < 1:
        raise ConfigError(
            f"postprocess_predictions: n_best_size={n_best_size} and max_answer_length="
            f"{max_answer_length} must be at least 1."
        )
    offsets = list(features["offset_mapping"])
    starts, ends = _logit_rows(start_logits, "start"), _logit_rows(end_logits, "end")
    if not len(starts) == len(ends) == len(offsets):
        raise DataError(
            f"postprocess_predictions: {len(offsets)} features but {len(starts)} rows of start logits and "
            f"{len(ends)} of end logits; give one row of each per feature, in the features' order."
        )
    ids, contexts = [str(i) for i in examples["id"]], list(examples["context"])
    spans = {}
    for example, feature_rows in enumerate(_features_of_examples(ids, features)):
        if not feature_rows:
            raise DataError(
                f"postprocess_predictions: example {ids[example]!r} has no feature; give the features of "
                "every example (qa_features gives each at least one)."
            )
        best_score, best_text, null_score = -np.inf, "", np.inf
        for row in feature_rows:
            start, end = _feature_logits(starts[row], row, offsets[row]), _feature_logits(ends[row], row, offsets[row])
            null_score = min(null_score, start[NO_ANSWER_INDEX] + end[NO_ANSWER_INDEX])
            span = best_valid_span(start, end, offsets[row], max_answer_length)
            if span is not None and span[2] > best_score:
                first, last, best_score = span
                best_text = contexts[example][offsets[row][first][0] : offsets[row][last][1]]
        spans[ids[example]] = (best_text, float(null_score - best_score))
    return spans


def best_threshold_metrics(
    spans: Mapping[str, tuple[str, float]], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """The official SQuAD v2.0 script's `best_exact` and `best_f1` (here `best_exact_match`, `best_f1`), in
    percent, with their thresholds: the scores had "no answer" been predicted exactly where the null margin
    (`best_spans`) exceeds the threshold, at the best threshold for each. The search is the script's: questions
    in increasing margin, each answered in turn (when answering none is best, the threshold is one below the
    least margin). A teacher whose spans are right but whose null score is too high
    shows here (F1 at the unanswerable share, best_f1 above it); the threshold is `null_score_diff_threshold`."""
    out = {}
    for name, score in (("exact_match", exact_match_score), ("f1", f1_score)):
        answered = {  # what answering a question adds to the count that starts from "no answer" everywhere
            question: max(score(spans[question][0], text) for text in _gold_answers(texts))
            if texts
            else -float(bool(spans[question][0]))
            for question, texts in references.items()
        }
        order = sorted(references, key=lambda q: spans[q][1])
        current = best = float(sum(not texts for texts in references.values()))
        threshold = spans[order[0]][1] - 1.0  # below every margin: "no answer" everywhere, the starting count
        for question in order:
            current += answered[question]
            if current > best:
                best, threshold = current, spans[question][1]
        out[f"best_{name}"] = 100.0 * best / len(references)
        out[f"best_{name}_thresh"] = float(threshold) if np.isfinite(threshold) else 0.0  # no span anywhere
    return out


def best_valid_span(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: Sequence[Sequence[int] | None], max_answer_length: int
) -> tuple[int, int, float] | None:
    """(start token, end token, start + end logit) of the best span with both ends on passage tokens (offsets not
    None), start <= end and at most `max_answer_length` tokens; None when there is no such span."""
    is_passage = np.array([_is_passage_token(offset) for offset in offsets], dtype=bool)
    length = len(is_passage)
    # Row s, column w: the span from token s to token s + w.
    ends = np.arange(length)[:, None] + np.arange(max_answer_length)[None, :]
    valid = (ends < length) & is_passage[:, None]
    ends = np.minimum(ends, length - 1)
    valid &= is_passage[ends]
    if not valid.any():
        return None
    scores = np.where(valid, start_logits[:length, None] + end_logits[ends], -np.inf)
    first, width = divmod(int(np.argmax(scores)), max_answer_length)
    return first, first + width, float(scores[first, width])


def _is_passage_token(offset: Sequence[int] | None) -> bool:
    return offset is not None and len(offset) == 2 and offset[0] >= 0


def _features_of_examples(ids: list[str], features: Any) -> list[list[int]]:
    """For each example, its feature rows: matched by `example_id` when features have it, else `example_index`."""
    columns = features.column_names if isinstance(features, datasets.Dataset) else features
    if "example_id" in columns:
        row_of_id = {example_id: row for row, example_id in enumerate(ids)}
        owners = [row_of_id.get(str(example_id), -1) for example_id in features["example_id"]]
    else:
        owners = [int(index) for index in features["example_index"]]
    rows: list[list[int]] = [[] for _ in ids]
    for feature, owner in enumerate(owners):
        if not 0 <= owner < len(ids):
            raise DataError(
                f"postprocess_predictions: feature {feature} belongs to no given example; give the "
                "examples the features were made from."
            )
        rows[owner].append(feature)
    return rows


def _as_float_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly bf16 on an accelerator
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _logit_rows(logits: Any, which: str) -> list[np.ndarray]:
    if hasattr(logits, "detach") or isinstance(logits, np.ndarray):
        array = _as_float_array(logits)
        if array.ndim != 2:
            raise DataError(
                f"postprocess_predictions: the {which} logits have shape {array.shape}; give [features, positions]."
            )
        return list(array)
    return [_as_float_array(row) for row in logits]


def _feature_logits(logits: np.ndarray, feature: int, offsets: Sequence[Any]) -> np.ndarray:
    """A feature's logits without the padding past its length."""
    if logits.ndim != 1 or len(logits) < len(offsets):
        raise DataError(
            f"postprocess_predictions: feature {feature} has {len(offsets)} tokens but its logits have "
            f"shape {logits.shape}; give one logit per token."
        )
    return logits[: len(offsets)]
