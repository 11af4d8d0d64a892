"""Hidden states and attention probabilities from Hugging Face BERT-style models.

In transformers 5 the default attention implementation is SDPA, which computes
attention without materialising the probabilities: asked for ``output_attentions``
it returns an empty tuple (with a logged warning), not an error. BERT's attention
layers look their implementation up on every call::

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward)

and the padding mask is built per forward in the format of
``config._attn_implementation`` (``masking_utils.create_bidirectional_mask``). So the
implementation can be switched per forward pass by changing the config for the
duration of that pass; :func:`attention_implementation` does that with
``PreTrainedModel.set_attn_implementation`` and restores the previous value on exit.

Passes that need attentions use :data:`PRE_DROPOUT_EAGER`, the eager computation
registered under its own name. It differs from transformers' ``"eager"`` only in what
it returns: ``"eager"`` returns the weights *after* attention dropout, which in
training mode are no longer probability rows (dropped entries are 0, the rest scaled
by ``1 / (1 - p)``), so a KL against them measures dropout noise. The registered
function applies the same dropout to the weights used for the values, and returns the
softmax probabilities ``A`` from before dropout. In eval mode both are identical.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import eager_mask

from kdexp.families import output_logits

PRE_DROPOUT_EAGER = "kdexp_eager_pre_dropout"

MODEL_INPUT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def eager_attention_with_pre_dropout_probabilities(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager scaled dot-product attention returning the pre-dropout probabilities.

    Same arguments and output as transformers' BERT ``eager_attention_forward``
    (``query``/``key``/``value`` ``[B, H, L, d]``, additive ``attention_mask``), and the
    same dropout on the weights applied to ``value``; the second output is
    ``softmax(Q K^T * scaling + mask)`` before dropout, ``[B, H, L, L]``.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = F.softmax(scores, dim=-1)
    dropped_weights = F.dropout(probabilities, p=dropout, training=module.training)
    attn_output = torch.matmul(dropped_weights, value).transpose(1, 2).contiguous()
    return attn_output, probabilities


# A name unknown to the mask registry would make masking_utils skip the padding mask
# entirely, so the eager (additive float) mask is registered under the same name.
AttentionInterface.register(PRE_DROPOUT_EAGER, eager_attention_with_pre_dropout_probabilities)
AttentionMaskInterface.register(PRE_DROPOUT_EAGER, eager_mask)


def _all_configs(model: PreTrainedModel) -> list[PreTrainedConfig]:
    """Every distinct config whose ``_attn_implementation`` a forward of ``model`` may read."""
    found: dict[int, PreTrainedConfig] = {}
    pending = [module.config for module in model.modules() if isinstance(module, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(
            sub_config for name in config.sub_configs if (sub_config := getattr(config, name, None)) is not None
        )
    return list(found.values())


@contextmanager
def attention_implementation(model: PreTrainedModel, implementation: str) -> Iterator[None]:
    """Run forwards of ``model`` with ``implementation`` (e.g. ``"eager"``, ``"sdpa"``) inside the block.

    The previous implementation of every config involved is restored on exit, also when
    the block raises. The values are restored as they were rather than re-requested
    through ``set_attn_implementation``, which would re-resolve them (for flash kernels
    that may mean loading a kernel again).

    Raises:
        RuntimeError: if the model does not support switching (transformers then only
            logs a warning and keeps its implementation).
    """
    saved = [(config, config._attn_implementation_internal) for config in _all_configs(model)]
    try:
        model.set_attn_implementation(implementation)
        if model.config._attn_implementation != implementation:
            raise RuntimeError(
                f"{type(model).__name__} kept attention implementation {model.config._attn_implementation!r} "
                f"when {implementation!r} was requested; it does not dispatch through ALL_ATTENTION_FUNCTIONS"
            )
        yield
    finally:
        for config, previous in saved:
            config._attn_implementation_internal = previous


# Where each encoder family keeps its transformer blocks, below the base model: BERT, RoBERTa and
# ELECTRA (``encoder.layer``), DistilBERT (``transformer.layer``).
BLOCK_CONTAINERS: tuple[str, ...] = ("encoder", "transformer")


def _block_container(model: PreTrainedModel) -> tuple[nn.Module, nn.ModuleList]:
    """The module holding the transformer blocks, and their ``ModuleList`` (its ``layer``)."""
    for name in BLOCK_CONTAINERS:
        container = getattr(model.base_model, name, None)
        layers = getattr(container, "layer", None)
        if isinstance(container, nn.Module) and isinstance(layers, nn.ModuleList):
            return container, layers
    raise TypeError(
        f"{type(model).__name__} has no encoder.layer or transformer.layer ModuleList: kdexp reads layers of BERT, "
        "RoBERTa, ELECTRA and DistilBERT encoders"
    )


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks of an encoder (``encoder.layer`` or ``transformer.layer``)."""
    return _block_container(model)[1]


def _install_output_capturing_hooks(model: PreTrainedModel) -> None:
    """Install transformers' output-recording hooks on every block before a truncated forward.

    transformers 5 collects ``hidden_states``/``attentions`` with forward hooks that the
    base model's first forward installs (``capture_outputs``) on the blocks present *at
    that time*, and then marks the model as hooked. A first forward under truncation
    would hook only the kept blocks, and later full forwards would silently return too
    few hidden states. So install them here, on the base model as its forward would.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers versions that collect outputs inside the encoder loop
        return
    maybe_install_capturing_hooks(cast(PreTrainedModel, model.base_model))  # a PreTrainedModel's body is one too


@contextmanager
def truncated_encoder(model: PreTrainedModel, num_layers: int | None) -> Iterator[None]:
    """Run forwards of ``model`` through its first ``num_layers`` transformer blocks only.

    Inside the block ``hidden_states`` has ``num_layers + 1`` entries and ``attentions``
    ``num_layers``, identical to the first entries of a full forward (a block only reads
    the blocks below it); the head then runs on the last computed block, so the logits
    are meaningless. Used when a stage needs nothing above a given layer: the blocks
    above are skipped instead of computed and discarded. ``None`` or a count at least
    the model depth runs the full model. The original ``ModuleList`` (same parameter
    objects) is restored on exit, also when the block raises.
    """
    encoder, layers = _block_container(model)
    if num_layers is None or num_layers >= len(layers):
        yield
        return
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    _install_output_capturing_hooks(model)
    encoder.layer = nn.ModuleList(list(layers)[:num_layers])
    try:
        yield
    finally:
        encoder.layer = layers


def eager_attention(model: PreTrainedModel) -> AbstractContextManager[None]:
    """Context in which ``model`` runs eager attention (:data:`PRE_DROPOUT_EAGER`) and returns probabilities ``A``."""
    return attention_implementation(model, PRE_DROPOUT_EAGER)


@dataclass
class ModelInternals:
    """Outputs of one forward pass.

    ``hidden_states``: ``L + 1`` tensors ``[B, L_seq, D]``, entry 0 the embedding output,
    entry ``i + 1`` the output of layer ``i``. ``attentions``: ``L`` tensors
    ``[B, H, L_seq, L_seq]`` of pre-dropout probabilities, entry ``i`` for layer ``i``.
    Either is None when not requested.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None
    attentions: tuple[Tensor, ...] | None


def model_inputs(batch: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """The entries of ``batch`` that are model inputs (labels and metadata are dropped).

    With ``model``, only those its ``forward`` takes: a DistilBERT student has no segment ids,
    although its teacher's tokenizer (BERT) gives them.
    """
    accepted = forward_arguments(type(model)) if model is not None else MODEL_INPUT_KEYS
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in accepted and batch.get(key) is not None}


def forward_arguments(model_class: type[nn.Module]) -> frozenset[str]:
    """The model inputs a model class's ``forward`` accepts by name."""
    return _accepted_inputs(model_class.forward)


@lru_cache(maxsize=64)
def _accepted_inputs(forward: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters) & frozenset(MODEL_INPUT_KEYS)


def forward_with_internals(
    model: PreTrainedModel,
    batch: Mapping[str, Any],
    need_attentions: bool,
    need_hidden_states: bool = True,
) -> ModelInternals:
    """Forward ``batch`` through ``model`` (e.g. ``BertForSequenceClassification``).

    Eager attention is used only when ``need_attentions`` is True; otherwise the
    model's own implementation (SDPA by default) runs. Gradient mode is the caller's:
    wrap teacher calls in ``torch.no_grad()``.
    """
    inputs = model_inputs(batch, model)
    if need_attentions:
        with eager_attention(model):
            outputs = model(**inputs, output_hidden_states=need_hidden_states, output_attentions=True, return_dict=True)
        if not outputs.attentions:
            raise RuntimeError(f"{type(model).__name__} returned no attentions under eager attention")
    else:
        outputs = model(**inputs, output_hidden_states=need_hidden_states, output_attentions=False, return_dict=True)
    return ModelInternals(
        logits=output_logits(outputs, batch),
        hidden_states=tuple(outputs.hidden_states) if need_hidden_states else None,
        attentions=tuple(outputs.attentions) if need_attentions else None,
    )
