"""EDA text augmentation (Wei & Zou, EMNLP 2019) for DBKD's ``N - 1`` augmented queries.

Four operations on the words of a text: synonym replacement (SR), random insertion
of a synonym (RI), random swap (RS) and random deletion (RD); synonyms come from
WordNet (:mod:`kdexp.decision.wordnet`). Choices, following the reference
implementation (``eda.py`` of EDA, used unchanged by DBKD) unless stated:

* Text handling (differs from the reference): the text is split on whitespace and
  rejoined with single spaces. Case and punctuation are kept (the reference
  lowercases and deletes everything but ``a-z``); an uncased tokenizer is unaffected,
  a cased one sees the original text. A word is looked up in WordNet by its *core*,
  lowercased with surrounding punctuation stripped (``"Movie,"`` -> ``movie``), and SR
  keeps the punctuation around the replaced core (``"Movie,"`` -> ``"film,"``).
  Synonyms are inserted as WordNet spells them, underscores as spaces; a multi-word
  synonym becomes several words.
* Change rate per copy (DBKD): ``|g|`` with ``g ~ Normal(0, (rate_scale sqrt(pi/2))^2)``,
  capped at ``max_rate`` (defaults 0.1 and 0.5, so the mean rate is 0.1). It is drawn
  afresh for every copy, as docs/methods/dbkd.md says (DBKD's code draws one rate per
  sentence and operation).
* Operations per copy: each copy applies one enabled operation. As in the reference
  ``eda()``, each enabled operation is scheduled ``num_copies // k + 1`` times
  (``k`` enabled operations), the schedule is shuffled and cut to ``num_copies``: the
  operations are balanced across the copies of a text, in random order.
* Amount of change: SR, RI and RS make ``n = max(1, int(rate * num_words))`` changes
  (the reference's truncation); RD deletes each word independently with probability
  ``rate``, never leaves the text empty (if every word is drawn for deletion, one
  random word is kept) and leaves a one-word text unchanged.
* SR replaces up to ``n`` distinct non-stop-word cores (EDA's stop-word list), each
  at all its occurrences, with a random WordNet synonym; cores without synonyms are
  skipped.
* RI inserts ``n`` times a random synonym of a random word of the *original* text
  (the reference may also pick a previously inserted word) at a random position,
  the end included (the reference never appends at the end); it tries up to
  ``10`` random words to find one with synonyms, as the reference does, and
  otherwise skips that insertion. Stop words are eligible, as in the reference.
* RS swaps two distinct positions ``n`` times (the reference retries a coincident
  pair at most three times and may then skip the swap); the multiset of words is kept.
* Sentence pairs: each side is augmented independently (own rate and operation), the
  first side's copies drawn before the second's from the same generator.
* :func:`augment` returns only the ``num_copies`` augmented texts; the caller adds the
  original to make DBKD's ``N = num_copies + 1`` queries.

``EDAConfig(style="authors")`` runs the query stage as the DBKD authors' code did instead:

* every text is cleaned first (:func:`clean_text`: lowercased, apostrophes dropped, hyphens and
  everything but ``a-z`` turned into spaces), the original query included, and every copy is
  cleaned again (WordNet synonyms come out lowercase, letters only); a text with no letters
  keeps its raw form in all ``N`` queries, as the authors' fallback does;
* one change rate per operation for a whole chunk of ``rows_per_draw`` rows (their
  ``datasets.map`` batch, 1,000 rows), each side of a pair drawn separately; RD's rate is
  drawn with RS's drawn rate as its mean, as their ``add_noise_to_all`` does;
* the schedule makes ``num_copies // k + 1`` copies per enabled operation, ``k`` counting only
  the operations whose rate makes ``int(rate * num_words) > 0`` (RD when its rate is > 0), then
  shuffles and cuts, as their ``eda()`` does.

RI keeps kdexp's rule (a random synonym, any position): the authors insert the first synonym of
a set, an order that Python's per-process string hashing decides, so no fixed rule reproduces it.

Randomness comes only from a ``random.Random`` (a seed or a generator), so the same
seed gives the same copies.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from kdexp.decision.wordnet import WordNet, shared_wordnet

# Stop words excluded from synonym replacement: the reference EDA list.
STOP_WORDS: frozenset[str] = frozenset(
    """i me my myself we our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves what which
    who whom this that these those am is are was were be been being have has had having do
    does did doing a an the and but if or because as until while of at by for with about
    against between into through during before after above below to from up down in out on
    off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very s t can will just
    don should now""".split()
)
RANDOM_INSERTION_ATTEMPTS = 10
EDA_STYLES = ("kdexp", "authors")

Example = str | tuple[str, str]


class EDAOperation(str, Enum):
    """The four EDA operations."""

    SYNONYM_REPLACEMENT = "synonym_replacement"
    RANDOM_INSERTION = "random_insertion"
    RANDOM_SWAP = "random_swap"
    RANDOM_DELETION = "random_deletion"


_OPERATIONS_NEEDING_WORDNET = frozenset({EDAOperation.SYNONYM_REPLACEMENT, EDAOperation.RANDOM_INSERTION})


@dataclass(frozen=True)
class EDAConfig:
    """Which EDA operations DBKD uses, and the distribution of the per-copy change rate.

    Defaults are the authors' default run: synonym replacement off, the other three on.

    Attributes:
        synonym_replacement, random_insertion, random_swap, random_deletion: enable
            each operation (at least one must be on).
        rate_scale: mean of the change rate ``|g|``, ``g ~ Normal(0, (rate_scale sqrt(pi/2))^2)``.
        max_rate: cap on the change rate.
    """

    synonym_replacement: bool = False
    random_insertion: bool = True
    random_swap: bool = True
    random_deletion: bool = True
    rate_scale: float = 0.1
    max_rate: float = 0.5
    style: str = "kdexp"  # "authors": the DBKD authors' text cleaning and per-chunk rates (module docstring)
    rows_per_draw: int = 1000  # style=authors: rows that share one draw of the change rates

    def __post_init__(self) -> None:
        if not self.enabled_operations():
            raise ValueError("EDAConfig needs at least one enabled operation")
        if self.style not in EDA_STYLES:
            raise ValueError(f"queries.eda.style must be one of {', '.join(EDA_STYLES)}, got {self.style!r}")
        if self.rows_per_draw < 1:
            raise ValueError(f"queries.eda.rows_per_draw must be at least 1, got {self.rows_per_draw}")
        if self.rate_scale < 0:
            raise ValueError(f"rate_scale must be non-negative, got {self.rate_scale}")
        if not 0 <= self.max_rate <= 1:
            raise ValueError(f"max_rate must lie in [0, 1], got {self.max_rate}")

    def enabled_operations(self) -> tuple[EDAOperation, ...]:
        """Enabled operations, in the fixed order SR, RI, RS, RD."""
        flags = {
            EDAOperation.SYNONYM_REPLACEMENT: self.synonym_replacement,
            EDAOperation.RANDOM_INSERTION: self.random_insertion,
            EDAOperation.RANDOM_SWAP: self.random_swap,
            EDAOperation.RANDOM_DELETION: self.random_deletion,
        }
        return tuple(operation for operation, enabled in flags.items() if enabled)

    @property
    def needs_wordnet(self) -> bool:
        return any(operation in _OPERATIONS_NEEDING_WORDNET for operation in self.enabled_operations())


@dataclass(frozen=True)
class AugmentedCopy:
    """One augmented copy with the operation and change rate that produced it."""

    text: str
    operation: EDAOperation
    change_rate: float


def as_random(rng: random.Random | int) -> random.Random:
    """A ``random.Random``: ``rng`` itself, or a new one seeded with the integer ``rng``."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise TypeError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")
    return random.Random(rng)


def example_random(seed: int, example_index: int) -> random.Random:
    """The generator for one example of a batch, independent of the other examples.

    String seeds are hashed with SHA-512 by ``random.Random``, so this is stable
    across processes (unlike ``hash``).
    """
    return random.Random(f"eda/{seed}/{example_index}")


def change_rate_std(config: EDAConfig) -> float:
    """Standard deviation of ``g``: ``rate_scale * sqrt(pi/2)``, so that ``E|g| = rate_scale``."""
    return config.rate_scale * math.sqrt(math.pi / 2.0)


def sample_change_rate(rng: random.Random, config: EDAConfig) -> float:
    """DBKD's per-copy change rate ``min(|g|, max_rate)``."""
    return min(abs(rng.gauss(0.0, change_rate_std(config))), config.max_rate)


def number_of_changes(change_rate: float, num_words: int) -> int:
    """Changes made by SR, RI and RS: ``max(1, int(rate * num_words))`` as in the reference."""
    return max(1, int(change_rate * num_words))


def split_surrounding_punctuation(word: str) -> tuple[str, str, str]:
    """``(leading punctuation, core, trailing punctuation)`` of a whitespace-free word."""
    without_leading = word.lstrip(string.punctuation)
    core = without_leading.rstrip(string.punctuation)
    return word[: len(word) - len(without_leading)], core, without_leading[len(core) :]


def word_core(word: str) -> str:
    """The WordNet lookup form of a word: lowercased, surrounding punctuation stripped."""
    return split_surrounding_punctuation(word)[1].lower()


def _respace(words: Sequence[str]) -> list[str]:
    """Split multi-word synonyms into words (and drop empty strings)."""
    return " ".join(words).split()


def _replace_core(word: str, replacement: str) -> str:
    leading, _, trailing = split_surrounding_punctuation(word)
    return f"{leading}{replacement}{trailing}"


def synonym_replacement(words: Sequence[str], num_changes: int, rng: random.Random, wordnet: WordNet) -> list[str]:
    """SR: replace up to ``num_changes`` distinct non-stop-word cores by a WordNet synonym.

    Every occurrence of a chosen core is replaced (by the same synonym), keeping each
    occurrence's surrounding punctuation.
    """
    cores = dict.fromkeys(word_core(word) for word in words)
    candidates = [core for core in cores if core and core not in STOP_WORDS]
    rng.shuffle(candidates)
    new_words = list(words)
    replaced = 0
    for core in candidates:
        if replaced >= num_changes:
            break
        synonyms = wordnet.synonyms(core)
        if not synonyms:
            continue
        synonym = rng.choice(synonyms)
        new_words = [_replace_core(word, synonym) if word_core(word) == core else word for word in new_words]
        replaced += 1
    return _respace(new_words)


def _random_synonym_of_some_word(cores: Sequence[str], rng: random.Random, wordnet: WordNet) -> str | None:
    for _ in range(RANDOM_INSERTION_ATTEMPTS):
        synonyms = wordnet.synonyms(rng.choice(cores))
        if synonyms:
            return rng.choice(synonyms)
    return None


def random_insertion(words: Sequence[str], num_changes: int, rng: random.Random, wordnet: WordNet) -> list[str]:
    """RI: ``num_changes`` times, insert a synonym of a random original word at a random position."""
    cores = [core for core in map(word_core, words) if core]
    new_words = list(words)
    if not cores:
        return new_words
    for _ in range(num_changes):
        synonym = _random_synonym_of_some_word(cores, rng, wordnet)
        if synonym is not None:
            new_words.insert(rng.randint(0, len(new_words)), synonym)
    return _respace(new_words)


def random_swap(words: Sequence[str], num_changes: int, rng: random.Random) -> list[str]:
    """RS: ``num_changes`` times, swap the words at two distinct random positions."""
    new_words = list(words)
    if len(new_words) < 2:
        return new_words
    for _ in range(num_changes):
        first = rng.randrange(len(new_words))
        second = rng.randrange(len(new_words) - 1)
        second += second >= first  # uniform over the positions other than `first`
        new_words[first], new_words[second] = new_words[second], new_words[first]
    return new_words


def random_deletion(words: Sequence[str], change_rate: float, rng: random.Random) -> list[str]:
    """RD: delete each word with probability ``change_rate``; never returns no words."""
    if len(words) <= 1:
        return list(words)
    kept = [word for word in words if rng.random() >= change_rate]
    if not kept:
        return [rng.choice(words)]
    return kept


def apply_operation(
    words: Sequence[str],
    operation: EDAOperation,
    change_rate: float,
    rng: random.Random,
    wordnet: WordNet | None,
) -> list[str]:
    """Apply one EDA operation at the given change rate."""
    if not words:
        return []
    num_changes = number_of_changes(change_rate, len(words))
    if operation in _OPERATIONS_NEEDING_WORDNET:
        if wordnet is None:
            raise ValueError(f"{operation.value} needs a WordNet")
        if operation is EDAOperation.SYNONYM_REPLACEMENT:
            return synonym_replacement(words, num_changes, rng, wordnet)
        return random_insertion(words, num_changes, rng, wordnet)
    if operation is EDAOperation.RANDOM_SWAP:
        return random_swap(words, num_changes, rng)
    return random_deletion(words, change_rate, rng)


def plan_operations(
    num_copies: int, config: EDAConfig, rng: random.Random, counted_operations: int | None = None
) -> list[EDAOperation]:
    """The operation of each copy: every enabled one ``num_copies // k + 1`` times, shuffled, cut.

    ``k`` is the number of enabled operations, or ``counted_operations`` (the authors' count).
    """
    if num_copies < 0:
        raise ValueError(f"num_copies must be non-negative, got {num_copies}")
    operations = config.enabled_operations()
    schedule = list(operations) * (num_copies // max(1, counted_operations or len(operations)) + 1)
    rng.shuffle(schedule)
    return schedule[:num_copies]


def _resolve_wordnet(config: EDAConfig, wordnet: WordNet | None) -> WordNet | None:
    if wordnet is None and config.needs_wordnet:
        return shared_wordnet()
    return wordnet


def augment_copies(
    text: str,
    num_copies: int,
    rng: random.Random | int,
    config: EDAConfig = EDAConfig(),
    wordnet: WordNet | None = None,
    rates: dict[EDAOperation, float] | None = None,
) -> list[AugmentedCopy]:
    """Like :func:`augment`, also returning each copy's operation and change rate.

    ``rates``: one fixed change rate per operation (the authors' style, :func:`authors_rates`),
    with the authors' schedule and cleaning; otherwise a rate is drawn for every copy.
    """
    rng = as_random(rng)
    wordnet = _resolve_wordnet(config, wordnet)
    if rates is not None:
        text = clean_text(text)
    words = text.split()
    counted = None if rates is None else _authors_counted_operations(config, rates, len(words))
    copies = []
    for operation in plan_operations(num_copies, config, rng, counted):
        change_rate = sample_change_rate(rng, config) if rates is None else rates[operation]
        new_words = apply_operation(words, operation, change_rate, rng, wordnet)
        new_text = " ".join(new_words)
        copies.append(AugmentedCopy(new_text if rates is None else clean_text(new_text), operation, change_rate))
    return copies


def clean_text(text: str) -> str:
    """The authors' text cleaning: lowercase ``a-z`` words separated by single spaces."""
    text = text.replace("\u2019", "").replace("'", "").lower()
    return " ".join("".join(c if "a" <= c <= "z" else " " for c in text).split())


def authors_rates(rng: random.Random, config: EDAConfig) -> dict[EDAOperation, float]:
    """One change rate per operation, drawn as the authors' ``add_noise_to_all`` draws them.

    SR, RI and RS: ``min(|g|, max_rate)``; RD: the same draw with RS's drawn rate in place of
    ``rate_scale`` (their code passes the drawn ``alpha_rs`` to the RD draw, so RD's rate is 0
    when RS is off).
    """
    rates = {operation: 0.0 for operation in EDAOperation}
    enabled = config.enabled_operations()
    for operation in (EDAOperation.SYNONYM_REPLACEMENT, EDAOperation.RANDOM_INSERTION, EDAOperation.RANDOM_SWAP):
        if operation in enabled:  # a disabled operation has rate 0 and draws nothing, as theirs
            rates[operation] = sample_change_rate(rng, config)
    if EDAOperation.RANDOM_DELETION not in enabled:
        return rates
    rates[EDAOperation.RANDOM_DELETION] = min(
        abs(rng.gauss(0.0, rates[EDAOperation.RANDOM_SWAP] * math.sqrt(math.pi / 2.0))), config.max_rate
    )
    return rates


def _authors_counted_operations(config: EDAConfig, rates: dict[EDAOperation, float], num_words: int) -> int:
    """The authors' ``technique_num``: operations whose rate changes at least one word."""
    return sum(
        (rates[op] > 0) if op is EDAOperation.RANDOM_DELETION else (int(rates[op] * num_words) > 0)
        for op in config.enabled_operations()
    )


def augment(
    text: str,
    num_copies: int,
    rng: random.Random | int,
    config: EDAConfig = EDAConfig(),
    wordnet: WordNet | None = None,
) -> list[str]:
    """``num_copies`` EDA copies of ``text`` (the original not included).

    Args:
        text: the input text.
        num_copies: copies to make (DBKD: ``N - 1 = 9``).
        rng: a ``random.Random`` (advanced in place) or an integer seed.
        config: enabled operations and change-rate distribution.
        wordnet: synonym source for SR and RI; by default the shared
            :class:`~kdexp.decision.wordnet.WordNet` at ``/usr/share/wordnet``.
    """
    return [copy.text for copy in augment_copies(text, num_copies, rng, config, wordnet)]


def augment_pair(
    text_a: str,
    text_b: str,
    num_copies: int,
    rng: random.Random | int,
    config: EDAConfig = EDAConfig(),
    wordnet: WordNet | None = None,
) -> list[tuple[str, str]]:
    """``num_copies`` copies of a sentence pair, each side augmented independently."""
    rng = as_random(rng)
    wordnet = _resolve_wordnet(config, wordnet)
    copies_a = augment(text_a, num_copies, rng, config, wordnet)
    copies_b = augment(text_b, num_copies, rng, config, wordnet)
    return list(zip(copies_a, copies_b))


def augment_batch(
    examples: Sequence[Example],
    num_copies: int,
    seed: int,
    config: EDAConfig = EDAConfig(),
    wordnet: WordNet | None = None,
) -> list[list[Example]]:
    """Copies of each example: a text, or a sentence pair given as a tuple of two texts.

    Example ``i`` uses :func:`example_random` ``(seed, i)``, so its copies do not depend
    on the other examples of the batch.
    """
    wordnet = _resolve_wordnet(config, wordnet)
    batch: list[list[Example]] = []
    for index, example in enumerate(examples):
        rng = example_random(seed, index)
        if isinstance(example, str):
            batch.append(list(augment(example, num_copies, rng, config, wordnet)))
        else:
            text_a, text_b = example
            batch.append(list(augment_pair(text_a, text_b, num_copies, rng, config, wordnet)))
    return batch
