"""Text smoothing core: distributions, smoothing, embeddings, and the top-k truncation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_config as shared_tiny_bert_config
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from kdexp.smoothing import (
    TokenDistributions,
    measure_topk_embedding_error,
    mlm_token_distributions,
    smooth_token_distributions,
    smoothed_inputs_embeds,
    special_or_padding_mask,
    topk_embedding_error_bound,
    topk_retained_mass,
)
from tests.conftest import tiny_tokenizer

VOCAB_SIZE = 40
PAD_ID, CLS_ID, SEP_ID = 0, 2, 3


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_bert_config(**overrides) -> BertConfig:
    """The shared tiny BERT, narrower, without dropout, over this module's vocabulary size."""
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return shared_tiny_bert_config(num_layers=2, num_labels=3, **{**settings, **overrides})


def sentence_pair_batch() -> dict[str, torch.Tensor]:
    """Two sequences ``[CLS] a [SEP] b [SEP]`` with padding, segment ids 0/1 and special tokens."""
    input_ids = torch.tensor(
        [
            [CLS_ID, 11, 12, 13, SEP_ID, 21, 22, SEP_ID],
            [CLS_ID, 14, 15, SEP_ID, 23, SEP_ID, PAD_ID, PAD_ID],
        ]
    )
    attention_mask = (input_ids != PAD_ID).long()
    token_type_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def keep_mask_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return special_or_padding_mask(batch["input_ids"], batch["attention_mask"], [PAD_ID, CLS_ID, SEP_ID])


def brute_force_embeddings(probabilities: list, weight: torch.Tensor) -> torch.Tensor:
    """``sum_v p_t(v) * E[v]`` with Python loops over batch, position and vocabulary."""
    batch, length, vocab = len(probabilities), len(probabilities[0]), len(probabilities[0][0])
    out = torch.zeros(batch, length, weight.shape[1], dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            for v in range(vocab):
                out[b, t] += probabilities[b][t][v] * weight[v].double()
    return out


def brute_force_smoothed_probabilities(logits, input_ids, keep, smooth_rate, temperature, top_k=None) -> list:
    """``p_t = lam * q_t + (1 - lam) * onehot(x_t)``, one position at a time, truncating by sorting."""
    result = []
    for b in range(logits.shape[0]):
        rows = []
        for t in range(logits.shape[1]):
            q = (logits[b, t].double() / temperature).softmax(-1).tolist()
            if top_k is not None:
                kept = sorted(range(len(q)), key=lambda v: q[v], reverse=True)[:top_k]
                mass = sum(q[v] for v in kept)
                q = [q[v] / mass if v in kept else 0.0 for v in range(len(q))]
            rate = 0.0 if keep[b, t] else smooth_rate
            rows.append([rate * q[v] + (1 - rate) * (v == int(input_ids[b, t])) for v in range(len(q))])
        result.append(rows)
    return result


def test_dense_distributions_are_the_tempered_softmax() -> None:
    logits = torch.randn(2, 5, VOCAB_SIZE)
    distributions = mlm_token_distributions(logits, temperature=2.0)
    assert distributions.is_dense and distributions.vocab_size == VOCAB_SIZE
    torch.testing.assert_close(distributions.probs, (logits / 2.0).softmax(-1))


def test_top_k_distributions_keep_the_most_probable_tokens_renormalised() -> None:
    logits = torch.randn(2, 5, VOCAB_SIZE)
    distributions = mlm_token_distributions(logits, temperature=0.5, top_k=4)
    q = (logits / 0.5).softmax(-1)
    top_probs, top_ids = q.topk(4, dim=-1)
    assert not distributions.is_dense
    assert distributions.probs.shape == (2, 5, 4)
    assert torch.equal(distributions.token_ids, top_ids)
    torch.testing.assert_close(distributions.probs, top_probs / top_probs.sum(-1, keepdim=True))
    torch.testing.assert_close(distributions.to_dense().sum(-1), torch.ones(2, 5))


@pytest.mark.parametrize("top_k", [None, 1, 5])
def test_smoothed_embedding_equals_brute_force_sum_over_vocabulary(top_k: int | None) -> None:
    torch.manual_seed(0)
    batch = sentence_pair_batch()
    keep = keep_mask_of(batch)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB_SIZE) * 3
    weight = torch.randn(VOCAB_SIZE, 6)

    smoothed = smooth_token_distributions(
        mlm_token_distributions(logits, temperature=1.5, top_k=top_k), batch["input_ids"], keep, smooth_rate=0.3
    )
    expected_probs = brute_force_smoothed_probabilities(logits, batch["input_ids"], keep, 0.3, 1.5, top_k)

    expected = torch.tensor(expected_probs, dtype=torch.float64)
    torch.testing.assert_close(smoothed.to_dense().double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        smoothed_inputs_embeds(smoothed, weight).double(),
        brute_force_embeddings(expected_probs, weight),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("top_k", [None, 3])
def test_special_tokens_and_padding_stay_exactly_one_hot(top_k: int | None) -> None:
    batch = sentence_pair_batch()
    keep = keep_mask_of(batch)
    assert keep.tolist() == [
        [True, False, False, False, True, False, False, True],
        [True, False, False, True, False, True, True, True],
    ]
    weight = torch.randn(VOCAB_SIZE, 6)
    smoothed = smooth_token_distributions(
        mlm_token_distributions(torch.randn(2, 8, VOCAB_SIZE), 1.0, top_k), batch["input_ids"], keep, smooth_rate=0.9
    )
    one_hot = F.one_hot(batch["input_ids"], VOCAB_SIZE).float()
    assert torch.equal(smoothed.to_dense()[keep], one_hot[keep])
    assert torch.equal(smoothed_inputs_embeds(smoothed, weight)[keep], weight[batch["input_ids"][keep]])
    assert not torch.equal(smoothed.to_dense()[~keep], one_hot[~keep])


def finetuning_loss(model, batch, labels, inputs_embeds=None):
    if inputs_embeds is None:
        token_inputs = {"input_ids": batch["input_ids"]}
    else:
        token_inputs = {"inputs_embeds": inputs_embeds}
    output = model(**token_inputs, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    return output.logits, F.cross_entropy(output.logits, labels)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("top_k", [None, 4])
def test_smooth_rate_zero_gives_exactly_the_finetuning_logits_loss_and_gradients(top_k: int | None) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    batch = sentence_pair_batch()
    labels = torch.tensor([0, 2])

    logits, loss = finetuning_loss(model, batch, labels)
    loss.backward()
    expected_gradients = gradients(model)
    model.zero_grad(set_to_none=True)

    smoothed = smooth_token_distributions(
        mlm_token_distributions(torch.randn(2, 8, VOCAB_SIZE), 1.0, top_k),
        batch["input_ids"],
        keep_mask_of(batch),
        smooth_rate=0.0,
    )
    word_embeddings = model.get_input_embeddings().weight
    smoothed_logits, smoothed_loss = finetuning_loss(
        model, batch, labels, inputs_embeds=smoothed_inputs_embeds(smoothed, word_embeddings)
    )
    smoothed_loss.backward()

    # BERT adds position and segment embeddings to inputs_embeds exactly as to looked-up ids.
    assert torch.equal(smoothed_logits, logits)
    torch.testing.assert_close(smoothed_loss, loss, atol=1e-6, rtol=0)
    smoothed_gradients = gradients(model)
    assert smoothed_gradients.keys() == expected_gradients.keys()
    assert "bert.embeddings.word_embeddings.weight" in smoothed_gradients
    for name, expected in expected_gradients.items():
        torch.testing.assert_close(smoothed_gradients[name], expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("top_k", [None, 4])
def test_gradients_reach_the_embeddings_of_tokens_the_teacher_proposes(top_k: int | None) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    batch = sentence_pair_batch()
    distributions = mlm_token_distributions(torch.randn(2, 8, VOCAB_SIZE) * 3, 1.0, top_k)
    smoothed = smooth_token_distributions(distributions, batch["input_ids"], keep_mask_of(batch), smooth_rate=0.5)
    word_embeddings = model.get_input_embeddings().weight
    _, loss = finetuning_loss(model, batch, torch.tensor([0, 1]), smoothed_inputs_embeds(smoothed, word_embeddings))
    loss.backward()

    proposed = set(distributions.to_dense().topk(4, dim=-1).indices[~keep_mask_of(batch)].flatten().tolist())
    proposed_only = sorted(proposed - set(batch["input_ids"].flatten().tolist()))
    assert proposed_only
    assert (word_embeddings.grad[proposed_only].norm(dim=-1) > 0).all()


def test_embedding_rejects_a_vocabulary_other_than_the_embedding_matrix() -> None:
    smoothed = TokenDistributions(torch.full((1, 2, VOCAB_SIZE), 1 / VOCAB_SIZE), None, VOCAB_SIZE)
    with pytest.raises(ValueError, match="share one vocabulary"):
        smoothed_inputs_embeds(smoothed, torch.randn(VOCAB_SIZE + 1, 4))


def tiny_mlm_logits() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    batch = sentence_pair_batch()
    with torch.no_grad():
        logits = model(**batch).logits
    return logits, batch, model.get_input_embeddings().weight.detach()


# A random tiny MLM gives logits of standard deviation about 0.09 per position: tau = 0.05
# makes q_t peaked (its top 4 of 40 tokens hold about 60% of the mass), tau = 5 nearly uniform.
PEAKED_TEMPERATURE, FLAT_TEMPERATURE = 0.05, 5.0


@pytest.mark.parametrize("temperature", [PEAKED_TEMPERATURE, FLAT_TEMPERATURE])
def test_top_k_embedding_error_is_exactly_the_head_tail_gap_and_within_the_bound(temperature: float) -> None:
    logits, batch, weight = tiny_mlm_logits()
    keep = keep_mask_of(batch)
    smooth_rate = 0.5
    exact_distributions = mlm_token_distributions(logits, temperature)
    exact = smoothed_inputs_embeds(
        smooth_token_distributions(exact_distributions, batch["input_ids"], keep, smooth_rate), weight
    )
    q = exact_distributions.probs
    previous_bound = None
    for top_k in [1, 2, 4, 8, 16, 32, VOCAB_SIZE]:
        truncated = smoothed_inputs_embeds(
            smooth_token_distributions(
                mlm_token_distributions(logits, temperature, top_k), batch["input_ids"], keep, smooth_rate
            ),
            weight,
        )
        error = (exact - truncated).norm(dim=-1)
        bound = topk_embedding_error_bound(topk_retained_mass(logits, top_k, temperature), weight, smooth_rate)

        # Derivation: e_exact - e_topk = lam * (1 - m) * (mu_tail - mu_head).
        head_ids = q.topk(top_k, dim=-1).indices
        head = torch.zeros_like(q).scatter(-1, head_ids, q.gather(-1, head_ids))
        tail = q - head
        mass = head.sum(-1, keepdim=True)
        mu_head = (head / mass) @ weight
        mu_tail = (tail / (1 - mass).clamp_min(1e-30)) @ weight
        rate = smooth_rate * (~keep).float().unsqueeze(-1)
        torch.testing.assert_close(exact - truncated, rate * (1 - mass) * (mu_tail - mu_head), atol=1e-5, rtol=0)

        assert (error[~keep] <= bound[~keep] + 1e-5).all()
        assert (error[keep] == 0).all()
        if previous_bound is not None:
            assert (bound <= previous_bound + 1e-6).all()
        previous_bound = bound
    assert error.max() < 1e-5, "k = V must reproduce the exact form"


def test_top_k_error_is_smaller_for_peaked_than_for_flat_distributions() -> None:
    logits, batch, weight = tiny_mlm_logits()
    keep = keep_mask_of(batch)
    top_ks = [1, 4, 16, VOCAB_SIZE]
    peaked = measure_topk_embedding_error(logits, batch["input_ids"], keep, weight, top_ks, 0.5, PEAKED_TEMPERATURE)
    flat = measure_topk_embedding_error(logits, batch["input_ids"], keep, weight, top_ks, 0.5, FLAT_TEMPERATURE)
    for peaked_error, flat_error in zip(peaked[:-1], flat[:-1]):
        assert peaked_error.relative_l2_difference < flat_error.relative_l2_difference
        assert peaked_error.min_retained_mass > flat_error.min_retained_mass
    for errors in (peaked, flat):
        assert all(error.max_l2_difference <= error.max_l2_bound + 1e-5 for error in errors)
        assert [error.top_k for error in errors] == top_ks
        assert errors[-1].relative_l2_difference < 1e-6 and errors[-1].max_abs_difference < 1e-6
        assert errors[-1].mean_retained_mass == pytest.approx(1.0)


def test_topk_report_on_a_tiny_run_keeps_more_mass_and_error_shrinks_with_k(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from kdexp.tools.topk_report import topk_report

    overrides = [
        f"teacher.name_or_path={tiny_model_dir}",
        "teacher.epochs=1",
        f"data.glue_dir={glue_dir}",
        "data.max_length=32",
        f"cache_dir={tmp_path / 'cache'}",
        "method.mlm.adapt.steps=3",
        "method.mlm.adapt.batch_size=4",
    ]
    vocab = len(tiny_tokenizer().get_vocab())
    result = topk_report(overrides, [2, 8, vocab], rows=6)
    masses = [e["mean_retained_mass"] for e in result["errors"]]
    rel = [e["relative_l2_difference"] for e in result["errors"]]
    assert masses[0] < masses[1] < masses[2] == pytest.approx(1.0, abs=1e-5)
    assert rel[0] > rel[1] > rel[2] and rel[2] < 1e-5  # k = |V| is the exact form
    assert all(e["max_l2_difference"] <= e["max_l2_bound"] + 1e-5 for e in result["errors"])
    assert result["adaptation_metrics"]["masked_lm_loss"] > 0 and result["vocab_size"] == vocab
