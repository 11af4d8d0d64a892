"""Text smoothing (Wu et al. 2020): smoothed token distributions and their MLM teacher."""

from kdexp.smoothing.mlm import (
    MissingMLMHeadError,
    MLMAdaptation,
    VocabularyMismatchError,
    adapt_mlm_head,
    check_same_vocabulary,
    load_mlm_teacher,
    vocabulary_fingerprint,
)
from kdexp.smoothing.smoothing import (
    TokenDistributions,
    TopKEmbeddingError,
    measure_topk_embedding_error,
    mlm_token_distributions,
    smooth_token_distributions,
    smoothed_inputs_embeds,
    special_or_padding_mask,
    topk_embedding_error_bound,
    topk_retained_mass,
)

__all__ = [
    "MLMAdaptation",
    "MissingMLMHeadError",
    "TokenDistributions",
    "TopKEmbeddingError",
    "VocabularyMismatchError",
    "adapt_mlm_head",
    "check_same_vocabulary",
    "load_mlm_teacher",
    "measure_topk_embedding_error",
    "mlm_token_distributions",
    "smooth_token_distributions",
    "smoothed_inputs_embeds",
    "special_or_padding_mask",
    "topk_embedding_error_bound",
    "topk_retained_mass",
    "vocabulary_fingerprint",
]
