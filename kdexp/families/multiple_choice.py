"""Multiple-choice reading comprehension (DREAM, RACE, one's own files): reading and model inputs.

A row is a passage (`context`), a `question`, its options (`choices`) and the index of the right
option (`label`). Two input forms, after the model that reads them:

- `pairs` (encoders, `AutoModelForMultipleChoice`): one sequence per option, `[CLS] passage [SEP]
  question option [SEP]`, the passage truncated first (Hugging Face's run_swag convention); the
  row's inputs are ``[C, L]`` and the model gives one logit per option;
- `prompt` (decoder LMs, the DBKD authors' MRC setting): one sequence, ``Context: <passage>
  Question: <question> Options: A. <option> B. <option> ... Answer:``, the passage cut from its
  start so that the question, the options and ``Answer:`` always fit; the model's next-token
  logits of the label words `` A``, `` B``, ... are the option logits (`kdexp.families.label_words`).

Local files: DREAM's official JSON (``[[turns], [{question, choice, answer}], id]`` items),
RACE's official folders (``<split>/{high,middle}/*.txt``, each a JSON object with ``article``,
``questions``, ``options``, ``answers``), or one's own JSON Lines with ``context``, ``question``,
``choices`` and ``label`` (an option's index, its letter, or its text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from kdexp.errors import DataError

INPUT_FORMS = ("pairs", "prompt")
LETTERS = "ABCDEFGH"


def features(num_choices: int) -> datasets.Features:
    return datasets.Features(
        {
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string"), length=num_choices),
            "label": datasets.Value("int64"),
        }
    )


def _answer_index(answer: Any, choices: Sequence[str], where: str) -> int:
    """The option an answer names: its index, its letter (``B``), or its text."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(text.upper())
    matches = [i for i, choice in enumerate(choices) if choice.strip() == text]
    if len(matches) != 1:
        raise DataError(
            f"{where}: the answer {answer!r} is none of the options {list(choices)} (nor an option's "
            "index or letter); give the right option's index, letter or exact text."
        )
    return matches[0]


def _rows_to_dataset(rows: list[dict[str, Any]], num_choices: int, where: str) -> datasets.Dataset:
    wrong = [i for i, row in enumerate(rows) if len(row["choices"]) != num_choices]
    if wrong:
        raise DataError(
            f"{where}: row {wrong[0]} has {len(rows[wrong[0]]['choices'])} options where the task has "
            f"{num_choices}; give every question the same number of options."
        )
    return datasets.Dataset.from_list(rows, features=features(num_choices))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err}).") from None


def read_dream_json(path: Path, num_choices: int = 3) -> datasets.Dataset:
    """DREAM's official file: each dialogue's turns (one per line) are the passage of its questions."""
    rows = []
    for item_no, item in enumerate(_load_json(path)):
        try:
            turns, questions = item[0], item[1]
            for question in questions:
                where = f"{path}: item {item_no}"
                rows.append(
                    {
                        "context": "\n".join(turns),
                        "question": question["question"],
                        "choices": list(question["choice"]),
                        "label": _answer_index(question["answer"], question["choice"], where),
                    }
                )
        except (KeyError, IndexError, TypeError):
            raise DataError(
                f"{path}: item {item_no} is not a DREAM item ([[turns], [{{question, choice, answer}}], id])."
            ) from None
    return _rows_to_dataset(rows, num_choices, str(path))


def read_race_folder(folder: Path, num_choices: int = 4) -> datasets.Dataset:
    """RACE's official release: one JSON file per article (``article``, ``questions``, ``options``, ``answers``)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".json"))
    if not files:
        raise DataError(
            f"{folder}: no RACE article files (*.txt) under it; RACE's release has "
            "<split>/high/*.txt and <split>/middle/*.txt."
        )
    rows = []
    for file in files:
        article = _load_json(file)
        try:
            for question, options, answer in zip(
                article["questions"], article["options"], article["answers"], strict=True
            ):
                rows.append(
                    {
                        "context": article["article"],
                        "question": question,
                        "choices": list(options),
                        "label": _answer_index(answer, options, str(file)),
                    }
                )
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{file}: not a RACE article (article, questions, options, answers of one length each)."
            ) from None
    return _rows_to_dataset(rows, num_choices, str(folder))


def read_own_file(path: Path, num_choices: int) -> datasets.Dataset:
    """One's own multiple-choice file: JSON Lines (or a JSON list) of ``context``, ``question``, ``choices``,
    ``label``; or a DREAM-format file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("[") and text.lstrip()[1:].lstrip().startswith("["):
        return read_dream_json(path, num_choices)
    records = _load_json(path) if text.lstrip().startswith("[") else _json_lines(path, text)
    rows = []
    for number, record in records:
        missing = [k for k in ("context", "question", "choices", "label") if k not in record]
        if missing:
            raise DataError(
                f"{path}:{number}: no {', '.join(missing)}; a multiple-choice row needs context, "
                "question, choices and label."
            )
        rows.append(
            {
                "context": str(record["context"]),
                "question": str(record["question"]),
                "choices": [str(c) for c in record["choices"]],
                "label": _answer_index(record["label"], record["choices"], f"{path}:{number}"),
            }
        )
    return _rows_to_dataset(rows, num_choices, str(path))


def _json_lines(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg}).") from None
    return rows


def from_hub(ds: datasets.Dataset, name: str, num_choices: int) -> datasets.Dataset:
    """The Hub's DREAM (``dialogue``, ``question``, ``choice``, ``answer`` text) or RACE (``article``,
    ``question``, ``options``, ``answer`` letter) in the family's columns."""

    def convert(row: Mapping[str, Any]) -> dict[str, Any]:
        if "dialogue" in row:
            context, choices = "\n".join(row["dialogue"]), list(row["choice"])
        else:
            context, choices = row["article"], list(row["options"])
        return {
            "context": context,
            "question": row["question"],
            "choices": choices,
            "label": _answer_index(row["answer"], choices, f"hub:{name}"),
        }

    return ds.map(convert, remove_columns=ds.column_names, features=features(num_choices))


# --------------------------------------------------------------------------- model inputs


def option_pairs(batch: Mapping[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    """`pairs` form: per row, one ``(passage, question + option)`` sequence per option, the passage truncated."""
    firsts, seconds, counts = [], [], []
    for context, question, choices in zip(batch["context"], batch["question"], batch["choices"]):
        firsts += [context] * len(choices)
        seconds += [f"{question} {choice}".strip() for choice in choices]
        counts.append(len(choices))
    encoded = tokenizer(firsts, seconds, truncation="only_first", max_length=max_length)
    out: dict[str, list] = {}
    for name, values in encoded.items():
        rows, start = [], 0
        for count in counts:
            rows.append(values[start : start + count])
            start += count
        out[name] = rows
    out["labels"] = list(batch["label"])
    return out


def prompt_text(context: str, question: str, choices: Sequence[str]) -> tuple[str, str]:
    """The decoder prompt in two parts: the passage part (cut first when too long) and the rest."""
    options = " ".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"Context: {context}", f" Question: {question} Options: {options} Answer:"


def label_words(num_choices: int) -> list[str]:
    """The words whose next-token logits are the options': `` A``, `` B``, ..."""
    return [f" {letter}" for letter in LETTERS[:num_choices]]


def prompts(batch: Mapping[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    """`prompt` form: one sequence per row; the passage is cut from its start so that the rest fits."""
    input_ids, attention_mask = [], []
    for context, question, choices in zip(batch["context"], batch["question"], batch["choices"]):
        head, tail = prompt_text(context, question, choices)
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        room = max(0, max_length - len(tail_ids))
        ids = (head_ids[len(head_ids) - room :] if room else []) + tail_ids
        ids = ids[-max_length:]
        input_ids.append(ids)
        attention_mask.append([1] * len(ids))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": list(batch["label"])}
