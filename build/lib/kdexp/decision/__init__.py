"""Framework-independent core of Decision-based KD (DBKD, Zhou et al., ACL 2023).

* :mod:`kdexp.decision.estimator`: the decision model ``P(z)`` and the decision-to-logits
  estimator ``z_hat`` from top-1 decision counts.
* :mod:`kdexp.decision.wordnet`: a small reader of the WordNet 3.0 database files.
* :mod:`kdexp.decision.eda`: EDA text augmentation (Wei & Zou 2019) for the ``N - 1``
  augmented queries.
* :mod:`kdexp.decision.teacher`: :class:`DecisionTeacher`, the black-box view of a fine-tuned
  teacher (``decide(texts) -> LongTensor`` of top-1 labels, nothing else).
* :mod:`kdexp.decision.queries`: the query stage (``N`` queries per training example, the
  decisions counted and cached); the methods are in :mod:`kdexp.methods.dbkd`.
"""

from kdexp.decision.eda import (
    AugmentedCopy,
    EDAConfig,
    EDAOperation,
    augment,
    augment_batch,
    augment_copies,
    augment_pair,
)
from kdexp.decision.estimator import (
    RootFindingError,
    all_count_vectors,
    decision_probabilities,
    estimate_logits_from_counts,
    smoothed_decision_frequencies,
    solve_logits,
    sorted_count_table,
)
from kdexp.decision.queries import DecisionQueries, QueryConfig, query_decisions
from kdexp.decision.teacher import DecisionTeacher
from kdexp.decision.wordnet import WordNet, WordNetNotFoundError

__all__ = [
    "AugmentedCopy",
    "DecisionQueries",
    "DecisionTeacher",
    "EDAConfig",
    "EDAOperation",
    "QueryConfig",
    "RootFindingError",
    "WordNet",
    "WordNetNotFoundError",
    "all_count_vectors",
    "augment",
    "augment_batch",
    "augment_copies",
    "augment_pair",
    "decision_probabilities",
    "estimate_logits_from_counts",
    "query_decisions",
    "smoothed_decision_frequencies",
    "solve_logits",
    "sorted_count_table",
]
