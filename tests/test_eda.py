"""EDA augmentation (kdexp.decision.eda) and the WordNet reader (kdexp.decision.wordnet)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from kdexp.decision.eda import (
    STOP_WORDS,
    EDAConfig,
    EDAOperation,
    augment,
    augment_batch,
    augment_copies,
    augment_pair,
    number_of_changes,
    plan_operations,
    random_deletion,
    random_insertion,
    random_swap,
    sample_change_rate,
    synonym_replacement,
    word_core,
)
from kdexp.decision.wordnet import (
    DEFAULT_WORDNET_PATH,
    WordNet,
    WordNetNotFoundError,
    parse_data_line_lemmas,
    parse_index_line,
)

SENTENCE = "the quick brown fox jumps over the lazy dog near the old river bank today"
ONLY = {
    operation: EDAConfig(
        synonym_replacement=operation is EDAOperation.SYNONYM_REPLACEMENT,
        random_insertion=operation is EDAOperation.RANDOM_INSERTION,
        random_swap=operation is EDAOperation.RANDOM_SWAP,
        random_deletion=operation is EDAOperation.RANDOM_DELETION,
    )
    for operation in EDAOperation
}


@pytest.fixture(scope="module")
def wordnet() -> WordNet:
    if not (Path(DEFAULT_WORDNET_PATH) / "index.noun").is_file():
        pytest.fail(
            f"these tests need the WordNet 3.0 database at {DEFAULT_WORDNET_PATH}: "
            "install it with `apt-get install wordnet-base`"
        )
    return WordNet()


class NoWordNet:
    """Stands in where WordNet must not be consulted."""

    def synonyms(self, word: str) -> list[str]:
        raise AssertionError(f"WordNet consulted for {word!r}")


def is_subsequence(short: list[str], long: list[str]) -> bool:
    remaining = iter(long)
    return all(word in remaining for word in short)


def synonym_words(words: list[str], wordnet: WordNet) -> set[str]:
    """Cores of every word of every WordNet synonym of the given words."""
    return {
        word_core(part) for word in words for synonym in wordnet.synonyms(word_core(word)) for part in synonym.split()
    }


# WordNet reader


def test_synonyms_of_known_words(wordnet):
    car = wordnet.synonyms("car")
    assert {"auto", "automobile", "machine", "motorcar", "railway car"} <= set(car)
    assert "car" not in car and len(car) == len(set(car))
    assert all("_" not in synonym for synonym in car)
    assert wordnet.synonyms("car") == car
    assert {"domestic dog", "Canis familiaris"} <= set(wordnet.synonyms("Dog"))
    assert "remote" in wordnet.synonyms("outback")  # "outback(a)" in data.adj: marker dropped
    assert wordnet.synonyms("xyzzyq") == []


def test_a_remembered_lookup_is_the_first_lookup_and_cannot_be_changed_by_a_caller(wordnet):
    words = ["car", "Dog", "dogs", "running", "geese", "remote", "xyzzyq", "good", "quickly"]
    first = {word: wordnet.synonyms(word) for word in words}
    first["car"].append("not a synonym")  # a caller's list is its own
    fresh = WordNet()
    for word in reversed(words):
        again = wordnet.synonyms(word)
        assert again == fresh.synonyms(word) == fresh._look_up_synonyms(word)
        assert "not a synonym" not in again


def test_synonyms_follow_base_forms(wordnet):
    assert {"dog", "domestic dog"} <= set(wordnet.synonyms("dogs"))
    assert "goose" in wordnet.synonyms("geese")  # noun.exc
    assert "run" in wordnet.synonyms("running")
    literal = WordNet(use_base_forms=False)
    assert literal.synonyms("dogs") == [] and "automobile" in literal.synonyms("car")


def test_index_and_data_line_parsing():
    line = "dog n 7 5 @ ~ #m #p %p 7 1 02084071 10114209 10023039 09886220 07676602 03901548 02710044  \n"
    assert parse_index_line(line) == (
        "dog",
        (2084071, 10114209, 10023039, 9886220, 7676602, 3901548, 2710044),
    )
    data = "02958343 06 n 05 car 0 auto 0 automobile 0 machine 1 motorcar 0 076 @ 03791235 n 0000 | a car\n"
    assert parse_data_line_lemmas(data) == ("car", "auto", "automobile", "machine", "motorcar")


def test_missing_database_raises_a_clear_error(tmp_path):
    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(WordNetNotFoundError) as error:
            WordNet(path)
        assert str(path) in str(error.value) and "apt-get install wordnet-base" in str(error.value)


# The four operations


def test_random_swap_keeps_the_multiset_of_words():
    words = SENTENCE.split()
    for seed in range(50):
        swapped = random_swap(words, 1 + seed % 5, random.Random(seed))
        assert Counter(swapped) == Counter(words)
    assert any(random_swap(words, 1, random.Random(seed)) != words for seed in range(5))
    assert random_swap(["alone"], 3, random.Random(0)) == ["alone"]


def test_random_deletion_never_empties_the_text():
    words = SENTENCE.split()
    for seed in range(100):
        kept = random_deletion(words, 0.3, random.Random(seed))
        assert 1 <= len(kept) and is_subsequence(kept, words)
        assert len(random_deletion(words, 1.0, random.Random(seed))) == 1
    assert random_deletion(["alone"], 1.0, random.Random(0)) == ["alone"]
    assert augment("alone", 5, 0, ONLY[EDAOperation.RANDOM_DELETION]) == ["alone"] * 5


def test_synonym_replacement_uses_wordnet_synonyms_of_the_words(wordnet):
    words = SENTENCE.split()
    allowed = synonym_words(words, wordnet)
    for seed in range(30):
        replaced = synonym_replacement(words, 2, random.Random(seed), wordnet)
        added = Counter(replaced) - Counter(words)
        assert added, "a replacement was expected: many words have synonyms"
        assert all(word_core(word) in allowed for word in added)
        removed = Counter(words) - Counter(replaced)
        assert not set(removed) & STOP_WORDS


def test_synonym_replacement_keeps_punctuation_and_skips_stop_words(wordnet):
    replaced = " ".join(synonym_replacement(["Good!"], 1, random.Random(0), wordnet))
    assert replaced.endswith("!") and replaced != "Good!"
    only_stop_words = ["the", "and", "is", "a"]
    assert synonym_replacement(only_stop_words, 4, random.Random(0), wordnet) == only_stop_words


def test_random_insertion_inserts_wordnet_synonyms_of_the_words(wordnet):
    words = SENTENCE.split()
    allowed = synonym_words(words, wordnet)
    for seed in range(30):
        inserted = random_insertion(words, 2, random.Random(seed), wordnet)
        assert is_subsequence(words, inserted) and len(inserted) > len(words)
        added = Counter(inserted) - Counter(words)
        assert all(word_core(word) in allowed for word in added)
    assert random_insertion(["xyzzyq"], 3, random.Random(0), wordnet) == ["xyzzyq"]


# Copies, seeds and the change rate


def test_same_seed_same_copies_and_different_seeds_differ(wordnet):
    config = EDAConfig(synonym_replacement=True)
    first = augment(SENTENCE, 9, 123, config, wordnet)
    assert len(first) == 9 and first == augment(SENTENCE, 9, random.Random(123), config, wordnet)
    by_seed = {tuple(augment(SENTENCE, 9, seed, config, wordnet)) for seed in range(20)}
    assert len(by_seed) >= 18


@pytest.mark.parametrize("operation", list(EDAOperation))
def test_a_disabled_operation_never_occurs(operation, wordnet):
    enabled = [other for other in EDAOperation if other is not operation]
    config = EDAConfig(**{other.value: other is not operation for other in EDAOperation})
    rng = random.Random(0)
    for num_copies in range(12):
        assert set(plan_operations(num_copies, config, rng)) <= set(enabled)
    copies = augment_copies(SENTENCE, 200, 1, config, wordnet)
    assert {copy.operation for copy in copies} == set(enabled)


def test_only_enabled_operation_shapes_every_copy(wordnet):
    words = SENTENCE.split()
    for copy in augment(SENTENCE, 30, 0, ONLY[EDAOperation.RANDOM_SWAP], NoWordNet()):
        assert Counter(copy.split()) == Counter(words)
    for copy in augment(SENTENCE, 30, 0, ONLY[EDAOperation.RANDOM_DELETION], NoWordNet()):
        assert is_subsequence(copy.split(), words)
    for copy in augment(SENTENCE, 30, 0, ONLY[EDAOperation.RANDOM_INSERTION], wordnet):
        assert is_subsequence(words, copy.split())


def test_operations_are_balanced_across_copies():
    config = EDAConfig()
    counts = Counter(plan_operations(9, config, random.Random(0)))
    assert sum(counts.values()) == 9 and max(counts.values()) <= 9 // 3 + 1
    assert EDAOperation.SYNONYM_REPLACEMENT not in counts  # the authors' default run


def test_change_rate_has_mean_a_tenth_and_is_capped():
    rng = random.Random(0)
    rates = [sample_change_rate(rng, EDAConfig()) for _ in range(40_000)]
    mean = sum(rates) / len(rates)
    # E|g| = 0.1 and sd(|g|) = 0.1 * sqrt(pi/2 - 1) ~= 0.0756: 4 standard errors = 0.0015.
    assert abs(mean - 0.1) < 0.0015
    assert min(rates) >= 0 and max(rates) <= 0.5
    wide = [sample_change_rate(rng, EDAConfig(rate_scale=0.5)) for _ in range(2_000)]
    assert max(wide) == 0.5
    copies = augment_copies(SENTENCE, 500, 3, ONLY[EDAOperation.RANDOM_SWAP])
    assert all(0 <= copy.change_rate <= 0.5 for copy in copies)


def test_number_of_changes_follows_the_reference():
    assert number_of_changes(0.0, 10) == 1
    assert number_of_changes(0.19, 10) == 1
    assert number_of_changes(0.5, 15) == 7


def test_sentence_pairs_augment_each_side(wordnet):
    first, second = "a man is playing a guitar", "someone plays music on stage"
    pairs = augment_pair(first, second, 6, 5, ONLY[EDAOperation.RANDOM_SWAP], wordnet)
    assert len(pairs) == 6
    for copy_a, copy_b in pairs:
        assert Counter(copy_a.split()) == Counter(first.split())
        assert Counter(copy_b.split()) == Counter(second.split())
    assert pairs == augment_pair(first, second, 6, 5, ONLY[EDAOperation.RANDOM_SWAP], wordnet)


def test_batch_copies_depend_only_on_seed_and_position(wordnet):
    pair = ("a man is playing a guitar", "someone plays music")
    batch = augment_batch([SENTENCE, pair], 4, seed=7, wordnet=wordnet)
    assert len(batch) == 2 and all(len(copies) == 4 for copies in batch)
    assert all(isinstance(copy, str) for copy in batch[0])
    assert all(isinstance(copy, tuple) and len(copy) == 2 for copy in batch[1])
    assert augment_batch(["something else entirely", pair], 4, seed=7, wordnet=wordnet)[1] == batch[1]
    assert augment_batch([SENTENCE, pair], 4, seed=8, wordnet=wordnet) != batch


def test_edge_cases():
    assert augment("", 3, 0, ONLY[EDAOperation.RANDOM_SWAP]) == ["", "", ""]
    assert augment(SENTENCE, 0, 0, ONLY[EDAOperation.RANDOM_SWAP]) == []
    with pytest.raises(ValueError, match="at least one"):
        EDAConfig(synonym_replacement=False, random_insertion=False, random_swap=False, random_deletion=False)
    with pytest.raises(TypeError):
        augment(SENTENCE, 3, "seed", ONLY[EDAOperation.RANDOM_SWAP])


# ---------------------------------------------------------------- the DBKD authors' style


def test_authors_cleaning_keeps_lowercase_letters_only():
    from kdexp.decision.eda import clean_text

    assert clean_text("It's a well-made, 2-hour film!") == "its a well made hour film"
    assert clean_text("  Don\u2019t\tstop\n") == "dont stop"
    assert clean_text("123 !!") == ""


def test_authors_rates_draw_rd_with_the_drawn_rs_rate_as_its_mean():
    import math

    from kdexp.decision.eda import authors_rates

    config = EDAConfig()  # SR off, RI, RS, RD on
    expected = random.Random(7)
    ri = min(abs(expected.gauss(0.0, 0.1 * math.sqrt(math.pi / 2))), 0.5)
    rs = min(abs(expected.gauss(0.0, 0.1 * math.sqrt(math.pi / 2))), 0.5)
    rd = min(abs(expected.gauss(0.0, rs * math.sqrt(math.pi / 2))), 0.5)
    rates = authors_rates(random.Random(7), config)
    assert rates == {
        EDAOperation.SYNONYM_REPLACEMENT: 0.0,
        EDAOperation.RANDOM_INSERTION: ri,
        EDAOperation.RANDOM_SWAP: rs,
        EDAOperation.RANDOM_DELETION: rd,
    }
    without_rs = authors_rates(random.Random(7), EDAConfig(random_swap=False))
    assert without_rs[EDAOperation.RANDOM_DELETION] == 0.0  # their RD rate is drawn from RS's


def test_authors_style_shares_rates_within_a_chunk_and_cleans_every_query():
    from kdexp.decision.queries import QueryConfig, augment_examples, chunk_rates, original_query

    config = QueryConfig(num_queries=5, seed=3, eda=EDAConfig(style="authors", rows_per_draw=2, random_insertion=False))
    assert chunk_rates(config, 0, 0) == chunk_rates(config, 1, 0)
    assert chunk_rates(config, 1, 0) != chunk_rates(config, 2, 0)
    assert chunk_rates(config, 0, 0) != chunk_rates(config, 0, 1)  # each side of a pair draws its own
    text = "The Movie's plot -- twisty, clever & well-paced -- never lets up, 10/10!"
    (copies,) = augment_examples([text], config)
    assert augment_examples([text], config) == [copies]  # same seed, same copies
    cleaned = "the movies plot twisty clever well paced never lets up"
    assert original_query(text, config) == cleaned
    for copy in copies:  # RS and RD only: each copy keeps (a sub-multiset of) the cleaned words
        assert copy == " ".join(copy.split()) and all(w.isalpha() and w.islower() for w in copy.split())
        assert not Counter(copy.split()) - Counter(cleaned.split())
    assert original_query(("A b!", "123"), config) == ("a b", "123")  # no letters: the raw text
    # one word: RS and RD leave it; a side with no letters stays raw in every copy
    assert augment_examples([("Fine.", "42")], config)[0] == [("fine", "42")] * 4


def test_authors_style_counts_only_operations_that_change_a_word():
    from kdexp.decision.eda import _authors_counted_operations

    config = EDAConfig()
    rates = {
        EDAOperation.SYNONYM_REPLACEMENT: 0.0,
        EDAOperation.RANDOM_INSERTION: 0.05,
        EDAOperation.RANDOM_SWAP: 0.2,
        EDAOperation.RANDOM_DELETION: 0.01,
    }
    # 10 words: int(0.05·10) = 0 (RI not counted), int(0.2·10) = 2 (RS counted), RD counted (rate > 0)
    assert _authors_counted_operations(config, rates, 10) == 2
    schedule = plan_operations(9, config, random.Random(0), counted_operations=2)
    assert len(schedule) == 9 and set(schedule) <= set(config.enabled_operations())


def test_the_default_style_leaves_existing_cache_keys_unchanged():
    from dataclasses import asdict

    from kdexp.decision.queries import _eda_key

    assert _eda_key(EDAConfig()) == {
        k: v for k, v in asdict(EDAConfig()).items() if k not in ("style", "rows_per_draw")
    }
    assert _eda_key(EDAConfig(style="authors"))["style"] == "authors"
    with pytest.raises(ValueError, match="queries.eda.style"):
        EDAConfig(style="paper")
