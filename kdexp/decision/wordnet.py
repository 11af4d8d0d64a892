"""A small reader of the WordNet 3.0 database (``wndb(5)`` layout), for EDA synonyms.

Reads Debian's ``wordnet-base`` files (``/usr/share/wordnet``): ``index.<pos>``
maps a lemma to its synset offsets, ``data.<pos>`` holds one synset per line at that
byte offset, and ``<pos>.exc`` lists irregular inflections. Files begin with
license lines that start with two spaces. No nltk.

Loading is lazy: an index file is parsed into ``lemma -> synset offsets`` the first
time its part of speech is needed (about 0.3 s for all four), and each synset line
is read by ``seek`` to its offset and cached.

Like nltk's ``wordnet.synsets`` (which EDA's reference code uses), a word is looked
up under its base forms (WordNet's "morphy"): for each part of speech, the forms
listed for it in the exception file, or else the word itself and the forms obtained
by one detachment rule (``dogs -> dog``, ``running -> run``...), kept if they are in
the index. nltk applies the rules repeatedly when one pass finds nothing; here a
single pass is made, as in WordNet's own ``morphstr``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

DEFAULT_WORDNET_PATH = "/usr/share/wordnet"
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")

# Detachment rules of WordNet's morphy (suffix, replacement) per part of speech.
_DETACHMENT_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "noun": (
        ("s", ""),
        ("ses", "s"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "verb": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
_LICENSE_LINE_PREFIX = "  "
# Adjective lemmas in data.adj may carry a syntactic marker: "(a)", "(p)" or "(ip)".
_ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


class WordNetNotFoundError(FileNotFoundError):
    """The WordNet database files are not at the given path."""


def _missing_database_message(path: Path, missing: list[str]) -> str:
    problem = "the folder does not exist" if not path.is_dir() else f"missing: {', '.join(missing)}"
    return (
        f"WordNet 3.0 database not found at {path} ({problem}). "
        "Install it with `apt-get install wordnet-base`, or pass the folder holding "
        "index.noun/data.noun etc. as WordNet(path=...)."
    )


def _required_files() -> list[str]:
    return [f"{kind}.{pos}" for pos in PARTS_OF_SPEECH for kind in ("index", "data")]


def lookup_key(word: str) -> str:
    """The index spelling of a word or collocation: lower case, spaces as underscores."""
    return "_".join(word.strip().lower().split())


def display_lemma(lemma: str) -> str:
    """A data-file lemma as text: underscores as spaces, adjective marker removed."""
    return _ADJECTIVE_MARKER.sub("", lemma).replace("_", " ")


def parse_index_line(line: str) -> tuple[str, tuple[int, ...]]:
    """``(lemma, synset offsets)`` of one ``index.<pos>`` line (``wndb(5)``).

    Fields: ``lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt
    synset_offset...``; the offsets are the last ``synset_cnt`` fields, in sense order.
    """
    fields = line.split()
    synset_count = int(fields[2])
    return fields[0], tuple(int(offset) for offset in fields[len(fields) - synset_count :])


def parse_data_line_lemmas(line: str) -> tuple[str, ...]:
    """The lemmas of one ``data.<pos>`` synset line, as stored (underscores kept).

    Fields: ``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] ...``
    with ``w_cnt`` two hexadecimal digits.
    """
    fields = line.split(" ", 4 + 2 * 256)
    word_count = int(fields[3], 16)
    return tuple(fields[4 + 2 * k] for k in range(word_count))


class WordNet:
    """Synonym lookup in a WordNet 3.0 database folder.

    Args:
        path: folder with ``index.{noun,verb,adj,adv}`` and ``data.*`` (Debian's
            ``wordnet-base`` installs them at ``/usr/share/wordnet``).
        use_base_forms: look a word up under its base forms too (``dogs -> dog``),
            like nltk's ``synsets``; see the module docstring.

    Raises:
        WordNetNotFoundError: if the folder or one of its index/data files is missing.
    """

    def __init__(self, path: str | Path = DEFAULT_WORDNET_PATH, use_base_forms: bool = True) -> None:
        self.path = Path(path)
        self.use_base_forms = use_base_forms
        missing = [name for name in _required_files() if not (self.path / name).is_file()]
        if missing:
            raise WordNetNotFoundError(_missing_database_message(self.path, missing))
        self._offsets_by_pos: dict[str, dict[str, tuple[int, ...]]] = {}
        self._exceptions_by_pos: dict[str, dict[str, tuple[str, ...]]] = {}
        self._lemmas_by_synset: dict[tuple[str, int], tuple[str, ...]] = {}
        # EDA asks for the same words again and again (ten copies of every row of a task): one lookup each.
        self._synonyms_by_word: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"WordNet(path={str(self.path)!r}, use_base_forms={self.use_base_forms})"

    def _index(self, pos: str) -> dict[str, tuple[int, ...]]:
        if pos not in self._offsets_by_pos:
            offsets: dict[str, tuple[int, ...]] = {}
            with open(self.path / f"index.{pos}", encoding="utf-8") as index_file:
                for line in index_file:
                    if not line.startswith(_LICENSE_LINE_PREFIX) and line.strip():
                        lemma, synset_offsets = parse_index_line(line)
                        offsets[lemma] = synset_offsets
            self._offsets_by_pos[pos] = offsets
        return self._offsets_by_pos[pos]

    def _exceptions(self, pos: str) -> dict[str, tuple[str, ...]]:
        """``inflected form -> base forms`` from ``<pos>.exc`` (empty if the file is absent)."""
        if pos not in self._exceptions_by_pos:
            exceptions: dict[str, tuple[str, ...]] = {}
            exception_path = self.path / f"{pos}.exc"
            if exception_path.is_file():
                with open(exception_path, encoding="utf-8") as exception_file:
                    for line in exception_file:
                        fields = line.split()
                        if len(fields) >= 2:
                            exceptions[fields[0]] = tuple(fields[1:])
            self._exceptions_by_pos[pos] = exceptions
        return self._exceptions_by_pos[pos]

    def base_forms(self, word: str, pos: str) -> list[str]:
        """Index lemmas that ``word`` may be an inflection of in ``pos`` (itself included)."""
        key = lookup_key(word)
        index = self._index(pos)
        if not self.use_base_forms:
            return [key] if key in index else []
        exceptions = self._exceptions(pos)
        if key in exceptions:
            candidates = [key, *exceptions[key]]
        else:
            candidates = [key] + [
                key[: -len(suffix)] + replacement
                for suffix, replacement in _DETACHMENT_RULES[pos]
                if key.endswith(suffix) and len(key) > len(suffix)
            ]
        return list(dict.fromkeys(form for form in candidates if form in index))

    def synset_offsets(self, word: str, pos: str) -> list[int]:
        """Byte offsets in ``data.<pos>`` of the synsets of ``word`` (via its base forms)."""
        index = self._index(pos)
        offsets = (offset for form in self.base_forms(word, pos) for offset in index[form])
        return list(dict.fromkeys(offsets))

    def _read_synsets(self, pos: str, offsets: list[int]) -> None:
        uncached = [offset for offset in offsets if (pos, offset) not in self._lemmas_by_synset]
        if not uncached:
            return
        with open(self.path / f"data.{pos}", "rb") as data_file:
            for offset in uncached:
                data_file.seek(offset)
                line = data_file.readline().decode("utf-8")
                if not line.startswith(f"{offset:08d} "):
                    raise ValueError(f"{self.path / f'data.{pos}'}: no synset at byte offset {offset}")
                self._lemmas_by_synset[(pos, offset)] = parse_data_line_lemmas(line)

    def synset_lemmas(self, pos: str, offset: int) -> tuple[str, ...]:
        """Lemmas of the synset at ``offset`` in ``data.<pos>``, as stored."""
        self._read_synsets(pos, [offset])
        return self._lemmas_by_synset[(pos, offset)]

    def synonyms(self, word: str) -> list[str]:
        """Lemmas of every synset of ``word`` in every part of speech, excluding ``word``.

        Underscores become spaces and adjective markers are dropped; WordNet's
        capitalisation is kept (``Canis familiaris``). The word itself is excluded
        case-insensitively. Deduplicated, in a deterministic order: parts of speech
        noun, verb, adj, adv; synsets in WordNet's sense order; lemmas in synset order.
        """
        known = self._synonyms_by_word.get(word)
        if known is None:
            known = self._synonyms_by_word[word] = tuple(self._look_up_synonyms(word))
        return list(known)

    def _look_up_synonyms(self, word: str) -> list[str]:
        excluded = " ".join(word.lower().split())
        synonyms: dict[str, None] = {}
        for pos in PARTS_OF_SPEECH:
            offsets = self.synset_offsets(word, pos)
            self._read_synsets(pos, offsets)
            for offset in offsets:
                for lemma in self._lemmas_by_synset[(pos, offset)]:
                    text = display_lemma(lemma)
                    if text.lower() != excluded:
                        synonyms.setdefault(text, None)
        return list(synonyms)


@lru_cache(maxsize=4)
def shared_wordnet(path: str = DEFAULT_WORDNET_PATH) -> WordNet:
    """One :class:`WordNet` per path for the process, so its index and caches are shared."""
    return WordNet(path)
