"""The MLM head of each supported encoder family, as a function of the encoder's last hidden states.

Text smoothing and MLM adaptation run the vocabulary projection only where they need it (the
masked positions; the real tokens, a chunk at a time), so they call the encoder and its head
separately. The head differs by family:

- BERT: ``cls`` (transform, then the decoder tied to the word embeddings);
- RoBERTa: ``lm_head``;
- ELECTRA (the generator's head): ``generator_predictions`` then ``generator_lm_head``;
- DistilBERT: ``vocab_transform``, the activation, ``vocab_layer_norm``, ``vocab_projector``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor, nn

from kdexp.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED_MLM_FAMILIES = "BERT (cls), RoBERTa (lm_head), ELECTRA (generator head) and DistilBERT (vocab_projector)"


def masked_lm_head(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``hidden states [..., D] -> vocabulary logits [..., V]`` of a ``*ForMaskedLM`` model."""
    if isinstance(getattr(model, "cls", None), nn.Module):
        return model.get_submodule("cls")
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        return model.get_submodule("lm_head")
    if isinstance(getattr(model, "generator_lm_head", None), nn.Module):
        return _in_order(model, "generator_predictions", "generator_lm_head")
    if isinstance(getattr(model, "vocab_projector", None), nn.Module):
        return _in_order(model, "vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")
    raise ModelError(
        f"{type(model).__name__} has no MLM head kdexp can read: text smoothing supports the heads of "
        f"{SUPPORTED_MLM_FAMILIES}; set method.mlm.name_or_path to such a model."
    )


def _in_order(model: nn.Module, *names: str) -> Callable[[Tensor], Tensor]:
    """The named submodules of ``model`` applied one after the other."""
    stages = [model.get_submodule(name) for name in names]

    def apply(hidden: Tensor) -> Tensor:
        for stage in stages:
            hidden = stage(hidden)
        return hidden

    return apply


def head_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    """The MLM head's own parameters (a decoder tied to the word embeddings belongs to the encoder)."""
    encoder_ids = {id(parameter) for parameter in model.base_model.parameters()}
    return [parameter for parameter in model.parameters() if id(parameter) not in encoder_ids]
