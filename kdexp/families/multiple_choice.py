"""Multiple-choice reading comprehension (DREAM, RACE, one's own files): reading and model inputs.

A row is a passage (`context`), a `question`, its options (`choices`) and the index of the right
option (`label`). Two input forms, after the model that reads them:

- `pairs` (encoders, `AutoModelForMultipleChoice`): one sequence per option, `[CLS] passage [SEP]
  question option [SEP]`, the passage truncated first (Hugging Face's run_swag convention); the
  row's inputs are ``[C, L]`` and the model gives one logit per option;
- `prompt` (decoder LMs, the DBKD authors' MRC setting): one sequence, ``Context: <passage>
  Question: <question> Options: A. <option> B. <option> ... Answer:``, the passage cut from its
  start (after its ``Context:`` label) so that the question, the options and ``Answer:`` always fit; the model's next-token
  logits of the label words `` A``, `` B``, ... are the option logits (`kdexp.families.label_words`).

Local files: DREAM's official JSON (``[[turns], [{question, choice, answer}], id]`` items),
RACE's official folders (``<split>/{high,middle}/*.txt``, each a JSON object with ``article``,
``questions``, ``options``, ``answers``), or one's own JSON Lines with ``context``, ``question``,
``choices`` and ``label`` (an option's index, its letter, or its text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from kdexp.errors import DataError
from kdexp.tasks import OPTION_LETTERS

INPUT_FORMS = ("pairs", "prompt")
LETTERS = OPTION_LETTERS


def features(num_choices: int) -> datasets.Features:
    return datasets.Features(
        {
            "context": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string"), length=num_choices),
            "label": datasets.Value("int64"),
        }
    )


def _answer_index(answer: Any, choices: Sequence[str], where: str, given_as: str = "any") -> int:
    """The option an answer names. `given_as`: ``text`` (DREAM gives the option's text), ``letter`` (RACE:
    ``B``) or ``any`` (one's own files: an index, a letter or a text; a label that reads as two different
    options, like ``A`` among the options ``C``, ``A``, ``B``, is refused)."""
    if given_as == "any" and isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise DataError(
            f"{where}: the label {answer} is no option's index (0 to {len(choices) - 1}); give the right "
            "option's index, letter or exact text."
        )
    text = str(answer).strip()
    letters = LETTERS[: len(choices)]
    by_letter = (
        {letters.index(text.upper())} if given_as != "text" and len(text) == 1 and text.upper() in letters else set()
    )
    by_text = {i for i, choice in enumerate(choices) if choice.strip() == text} if given_as != "letter" else set()
    named = by_letter | by_text
    if len(named) == 1:
        return named.pop()
    if by_letter and by_text:
        raise DataError(
            f"{where}: the label {answer!r} is option {min(by_letter)}'s letter and option {min(by_text)}'s text; "
            "give the option's index instead."
        )
    expected = {"text": "the right option's exact text", "letter": "the right option's letter"}.get(
        given_as, "the right option's index, letter or exact text"
    )
    what = "several options" if len(by_text) > 1 else f"none of the options {list(choices)}"
    raise DataError(f"{where}: the answer {answer!r} is {what}; give {expected}.")


def _rows_to_dataset(rows: list[dict[str, Any]], num_choices: int, where: str) -> datasets.Dataset:
    wrong = [i for i, row in enumerate(rows) if len(row["choices"]) != num_choices]
    if wrong:
        raise DataError(
            f"{where}: row {wrong[0]} has {len(rows[wrong[0]]['choices'])} options where the task has "
            f"{num_choices}; give every question the same number of options (one's own files: task.num_choices=N)."
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
                        "label": _answer_index(question["answer"], question["choice"], where, "text"),
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
                        "label": _answer_index(answer, options, str(file), "letter"),
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
    if text.lstrip().startswith("["):
        records = [(f"{path}: item {number}", record) for number, record in enumerate(_load_json(path))]
    else:
        records = [(f"{path}:{number}", record) for number, record in _json_lines(path, text)]
    rows = []
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: not a JSON object; a multiple-choice row is {{context, question, choices, label}}."
            )
        missing = [k for k in ("context", "question", "choices", "label") if k not in record]
        if missing:
            raise DataError(
                f"{where}: no {', '.join(missing)}; a multiple-choice row needs context, question, choices and label."
            )
        rows.append(
            {
                "context": str(record["context"]),
                "question": str(record["question"]),
                "choices": [str(c) for c in record["choices"]],
                "label": _answer_index(record["label"], record["choices"], where),
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
            context, choices, given_as = "\n".join(row["dialogue"]), list(row["choice"]), "text"
        else:
            context, choices, given_as = row["article"], list(row["options"]), "letter"
        return {
            "context": context,
            "question": row["question"],
            "choices": choices,
            "label": _answer_index(row["answer"], choices, f"hub:{name}", given_as),
        }

    return ds.map(convert, remove_columns=ds.column_names, features=features(num_choices))


# --------------------------------------------------------------------------- model inputs


BLANK = re.compile(r"_+")


def option_text(question: str, choice: str) -> str:
    """The second sequence of an option's pair: the question with its blank (a run of ``_``, as in RACE's and
    DREAM's cloze questions) filled by the option, or the question followed by the option."""
    if BLANK.search(question):
        return BLANK.sub(lambda _: choice.strip(), question).strip()
    return f"{question} {choice}".strip()


def option_pairs(
    batch: Mapping[str, list], tokenizer: Any, max_length: int, cut_long_options: bool = False
) -> dict[str, list]:
    """`pairs` form: per row, one ``(passage, question with option)`` sequence per option, the passage truncated.

    A question with an option that does not fit beside the special tokens is a DataError naming it; with
    `cut_long_options` (augmented queries, whose originals fitted) it is cut instead."""
    firsts, seconds, counts = [], [], []
    for context, question, choices in zip(batch["context"], batch["question"], batch["choices"]):
        firsts += [context] * len(choices)
        seconds += [option_text(question, choice) for choice in choices]
        counts.append(len(choices))
    try:
        encoded = tokenizer(firsts, seconds, truncation="only_first", max_length=max_length)
    except Exception as err:  # the tokenizers library refuses when the passage cannot absorb the cut
        if not cut_long_options:
            lengths = [len(ids) for ids in tokenizer(seconds, add_special_tokens=False)["input_ids"]]
            longest = max(range(len(seconds)), key=lengths.__getitem__)
            room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
            if lengths[longest] <= room:
                raise
            raise _too_long(
                seconds[longest], lengths[longest], room, max_length, "the question with this option"
            ) from err
        encoded = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)
    out: dict[str, list] = {}
    for name, values in encoded.items():
        rows, start = [], 0
        for count in counts:
            rows.append(values[start : start + count])
            start += count
        out[name] = rows
    out["labels"] = list(batch["label"])
    return out


def _too_long(text: str, length: int, room: int, max_length: int, what: str) -> DataError:
    """The error for a part of an input that must stay whole (`text`, `length` tokens) and does not fit."""
    return DataError(
        f"{what} ({text[:80]!r}) takes {length} tokens, more than the {room} that data.max_length={max_length} "
        "leaves it; raise data.max_length (or drop such rows from the data)."
    )


PASSAGE_LABEL = "Context:"


def prompt_text(context: str, question: str, choices: Sequence[str]) -> tuple[str, str]:
    """The decoder prompt in two parts: the passage part (cut first when too long) and the rest."""
    options = " ".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{PASSAGE_LABEL} {context}", f" Question: {question} Options: {options} Answer:"


def passage_part(head_ids: list[int], room: int, label_ids: list[int]) -> list[int]:
    """The passage part in at most `room` tokens: whole when it fits, else its label and the passage's end (the
    label goes too only when nothing of the passage would fit beside it)."""
    if len(head_ids) <= room:
        return head_ids
    if room <= len(label_ids):
        return head_ids[len(head_ids) - room :] if room > 0 else []
    return label_ids + head_ids[len(head_ids) - (room - len(label_ids)) :]


def label_words(num_choices: int) -> list[str]:
    """The words whose next-token logits are the options': `` A``, `` B``, ..."""
    return [f" {letter}" for letter in LETTERS[:num_choices]]


def prompts(
    batch: Mapping[str, list], tokenizer: Any, max_length: int, cut_long_options: bool = False
) -> dict[str, list]:
    """`prompt` form: one sequence per row; the passage is cut from its start so that the rest fits, and
    keeps its label ("Context:") so that every prompt reads alike. A tokenizer
    that starts every text with its BOS token (OPT, Llama) gets it here too; GPT-2's adds none.

    A question with options that do not fit alone is a DataError naming it; with `cut_long_options`
    (augmented queries) the prompt keeps its last `max_length` tokens instead."""
    bos = [i for i in tokenizer("")["input_ids"] if i == tokenizer.bos_token_id][:1]
    label_ids = tokenizer(PASSAGE_LABEL, add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = [], []
    for context, question, choices in zip(batch["context"], batch["question"], batch["choices"]):
        head, tail = prompt_text(context, question, choices)
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        room = max_length - len(bos) - len(tail_ids)
        if room < 0 and not cut_long_options:
            raise _too_long(tail, len(tail_ids), max_length - len(bos), max_length, "the question with its options")
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = passage_part(head_ids, room, label_ids) + tail_ids
        ids = bos + ids[-(max_length - len(bos)) :]
        input_ids.append(ids)
        attention_mask.append([1] * len(ids))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": list(batch["label"])}
