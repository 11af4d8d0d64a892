"""The MLM teacher: refusing headless checkpoints and foreign vocabularies, and the MLM adaptation stage."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer as shared_tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

from kdexp.smoothing import (
    MissingMLMHeadError,
    VocabularyMismatchError,
    adapt_mlm_head,
    check_same_vocabulary,
    load_mlm_teacher,
    vocabulary_fingerprint,
)
from kdexp.smoothing.mlm import mask_tokens

WORDS = [f"w{i}" for i in range(12)]
HEAD_KEYS = [
    "cls.predictions.bias",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.dense.weight",
]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_tokenizer(words: list[str] = WORDS) -> BertTokenizer:
    return shared_tiny_tokenizer(words)


def tiny_config(tokenizer: BertTokenizer, **overrides) -> BertConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def save_with_tokenizer(model, tokenizer: BertTokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def drop_checkpoint_weights(directory: Path, keys: list[str]) -> None:
    weights = load_file(directory / "model.safetensors")
    for key in keys:
        del weights[key]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def test_encoder_checkpoint_without_mlm_head_is_refused(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = save_with_tokenizer(BertModel(tiny_config(tokenizer)), tokenizer, tmp_path / "encoder")
    with pytest.raises(MissingMLMHeadError) as refusal:
        load_mlm_teacher(path, expected_vocab=tokenizer)
    message = str(refusal.value)
    assert str(path) in message
    assert all(key in message for key in HEAD_KEYS)
    # The decoder weight is tied to the loaded word embeddings: not missing.
    assert "cls.predictions.decoder.weight" not in message
    assert "Missing encoder weights" not in message
    assert "MLM adaptation stage" in message and "adapt_mlm_head" in message
    assert "*ForMaskedLM" in message


def test_checkpoint_missing_only_the_output_bias_is_refused(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = save_with_tokenizer(BertForMaskedLM(tiny_config(tokenizer)), tokenizer, tmp_path / "mlm")
    drop_checkpoint_weights(path, ["cls.predictions.bias"])
    with pytest.raises(MissingMLMHeadError, match=r"cls\.predictions\.bias"):
        load_mlm_teacher(path)


def test_untied_decoder_weight_missing_is_refused(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    model = BertForMaskedLM(tiny_config(tokenizer, tie_word_embeddings=False))
    path = save_with_tokenizer(model, tokenizer, tmp_path / "untied")
    drop_checkpoint_weights(path, ["cls.predictions.decoder.weight"])
    with pytest.raises(MissingMLMHeadError, match=r"cls\.predictions\.decoder\.weight"):
        load_mlm_teacher(path)


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_masked_lm_checkpoint_loads_with_its_trained_head(tmp_path: Path, tie_word_embeddings: bool) -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    original = BertForMaskedLM(tiny_config(tokenizer, tie_word_embeddings=tie_word_embeddings)).eval()
    with torch.no_grad():
        original.cls.predictions.bias.normal_()
    path = save_with_tokenizer(original, tokenizer, tmp_path / "mlm")

    teacher = load_mlm_teacher(path, expected_vocab=tokenizer)

    decoder_is_embedding = teacher.cls.predictions.decoder.weight is teacher.get_input_embeddings().weight
    assert decoder_is_embedding == tie_word_embeddings
    assert not teacher.training
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    inputs = tokenizer(["w1 w2 w3", "w4 w5"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(teacher(**inputs).logits, original(**inputs).logits)


def test_vocabulary_other_than_the_students_is_refused(tmp_path: Path) -> None:
    teacher_tokenizer = tiny_tokenizer()
    path = save_with_tokenizer(BertForMaskedLM(tiny_config(teacher_tokenizer)), teacher_tokenizer, tmp_path / "mlm")
    student_tokenizer = tiny_tokenizer(WORDS[:6] + ["other"] + WORDS[6:])

    with pytest.raises(VocabularyMismatchError) as refusal:
        load_mlm_teacher(path, expected_vocab=student_tokenizer)
    message = str(refusal.value)
    assert str(path) in message
    assert "teacher: 17 tokens" in message and "student: 18 tokens" in message
    assert vocabulary_fingerprint(teacher_tokenizer.get_vocab())[:16] in message
    assert vocabulary_fingerprint(student_tokenizer.get_vocab())[:16] in message

    # Same tokens and size, two ids swapped: still a different vocabulary.
    swapped = dict(teacher_tokenizer.get_vocab())
    swapped["w0"], swapped["w1"] = swapped["w1"], swapped["w0"]
    with pytest.raises(VocabularyMismatchError, match="2 tokens differ"):
        load_mlm_teacher(path, expected_vocab=swapped)

    assert load_mlm_teacher(path, expected_vocab=dict(teacher_tokenizer.get_vocab())) is not None


def test_vocabulary_cannot_be_checked_without_a_saved_tokenizer(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = tmp_path / "model_only"
    BertForMaskedLM(tiny_config(tokenizer)).save_pretrained(path)
    with pytest.raises(VocabularyMismatchError, match="Save the tokenizer next to the model"):
        load_mlm_teacher(path, expected_vocab=tokenizer)


def test_check_same_vocabulary_accepts_identical_maps_in_any_order() -> None:
    vocab = tiny_tokenizer().get_vocab()
    check_same_vocabulary(dict(reversed(list(vocab.items()))), vocab, teacher_name="teacher")
    assert vocabulary_fingerprint(dict(reversed(list(vocab.items())))) == vocabulary_fingerprint(vocab)


def test_masking_follows_bert_80_10_10_and_never_touches_special_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 17, (400, 30))
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 25:] = 0
    special = torch.zeros_like(input_ids)
    special[:, 0] = special[:, -1] = 1
    batch = mask_tokens(input_ids, attention_mask, special, 4, 17, 0.15, generator)

    selected = batch.labels != -100
    assert torch.equal(batch.labels[selected], input_ids[selected])
    assert not selected[:, 0].any() and not selected[:, 25:].any()
    assert torch.equal(batch.input_ids[~selected], input_ids[~selected])
    assert selected.any(dim=-1).all()
    assert 0.13 < selected.float().sum() / (400 * 24) < 0.18
    became_mask = (batch.input_ids[selected] == 4).float().mean()
    unchanged = (batch.input_ids[selected] == input_ids[selected]).float().mean()
    assert 0.75 < became_mask < 0.85
    assert 0.07 < unchanged < 0.14  # the 10% kept plus random draws of the same token


@pytest.mark.parametrize("pairs", [False, True])
def test_adaptation_texts_packed_batch_by_batch_give_the_tokenizers_own_padded_batches(
    pairs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adaptation texts are tokenised a few at a time into flat arrays (memory of a few bytes a token, at
    RACE's size too); a batch of them is the tokenizer's padded batch of the same texts, texts with no ordinary
    token (nothing to mask) left out."""
    from conftest import SENTENCES

    import kdexp.smoothing.mlm as mlm_module

    monkeypatch.setattr(mlm_module, "TOKENIZE_BATCH", 5)  # several tokenizer calls
    tokenizer = shared_tiny_tokenizer()
    texts: list = list(zip(SENTENCES, SENTENCES[::-1])) if pairs else list(SENTENCES)
    texts.insert(7, ("", "") if pairs else "")  # only special tokens: dropped
    packed = mlm_module._tokenize(texts, tokenizer, max_length=9)
    kept = [text for i, text in enumerate(texts) if i != 7]
    assert len(packed) == len(kept)
    for rows in ([0, 1, 2], [11, 3, 7, 5], list(range(len(kept)))):
        chosen = [kept[r] for r in rows]
        columns = [chosen] if not pairs else [[t[0] for t in chosen], [t[1] for t in chosen]]
        expected = tokenizer(*columns, truncation=True, max_length=9, padding=True, return_special_tokens_mask=True)
        batch = packed.masked_batch(rows, tokenizer, 0.15, torch.Generator().manual_seed(0))
        masked = batch.labels != -100  # the masked positions hold their original ids as labels
        assert torch.where(masked, batch.labels, batch.input_ids).tolist() == expected["input_ids"]
        assert batch.attention_mask.tolist() == expected["attention_mask"]
        assert not (masked & torch.tensor(expected["special_tokens_mask"]).bool()).any()
        if pairs:
            assert batch.token_type_ids is not None and batch.token_type_ids.tolist() == expected["token_type_ids"]


def test_adapt_mlm_head_learns_and_its_checkpoint_is_accepted(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    encoder_path = save_with_tokenizer(BertModel(tiny_config(tokenizer)), tokenizer, tmp_path / "encoder")
    encoder_word_embeddings = load_file(encoder_path / "model.safetensors")["embeddings.word_embeddings.weight"]
    # A repetitive pattern: the token at each position is the same in every text.
    texts = [" ".join(WORDS[:length]) for length in range(4, 13)] * 8

    adaptation = adapt_mlm_head(
        encoder_path, texts, tokenizer, steps=60, batch_size=16, learning_rate=1e-2, heldout_fraction=0.25, seed=0
    )

    metrics = adaptation.metrics
    assert metrics["heldout_examples"] == 18 and metrics["train_examples"] == 54
    assert metrics["head_initialisation"] == "fresh"
    assert metrics["masked_token_accuracy"] > metrics["initial_masked_token_accuracy"] + 0.3
    assert metrics["masked_lm_loss"] < metrics["initial_masked_lm_loss"]
    # Head only: the encoder (and the tied decoder) are unchanged.
    assert torch.equal(adaptation.model.get_input_embeddings().weight, encoder_word_embeddings)

    saved = adaptation.save(tmp_path / "adapted")
    teacher = load_mlm_teacher(saved, expected_vocab=tokenizer)
    inputs = tokenizer(["w0 w1 [MASK] w3"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(teacher(**inputs).logits, adaptation.model(**inputs).logits)
    assert (saved / "mlm_adaptation_metrics.json").is_file()


def test_adapt_mlm_head_refuses_an_incomplete_encoder(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    encoder_path = save_with_tokenizer(BertModel(tiny_config(tokenizer)), tokenizer, tmp_path / "encoder")
    drop_checkpoint_weights(encoder_path, ["encoder.layer.0.attention.self.query.weight"])
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query\.weight"):
        adapt_mlm_head(encoder_path, ["w0 w1", "w2 w3"], tokenizer, steps=1)


def test_questions_that_share_a_passage_are_held_out_together_and_never_all() -> None:
    from kdexp.smoothing.mlm import _whole_groups

    rng = random.Random(0)
    passages = [f"passage {rng.randrange(9)}" for _ in range(200)]
    for seed in range(5):
        kept_out = _whole_groups(passages, 20, torch.Generator().manual_seed(seed))
        held = {passages[i] for i in kept_out}
        assert kept_out == {i for i, p in enumerate(passages) if p in held}, "a passage was split"
        assert len(kept_out) >= 20 and len(held) < 9
        # Groups are taken until 20 are out: the last one taken crossed the line.
        assert len(kept_out) < 20 + max(passages.count(p) for p in held)
    assert _whole_groups(["the same"] * 5, 1, torch.Generator().manual_seed(0)) == set()  # never every group


def test_the_row_split_keeps_both_parts_in_shuffled_order_as_cached_adaptations_were_made() -> None:
    """Classification keys have no split part: the split must stay the one the cached MLMs were trained on."""
    from kdexp.smoothing.mlm import _split_heldout

    tokenizer = tiny_tokenizer()
    texts = [" ".join(WORDS[i % 12 : i % 12 + 1 + i % 5]) for i in range(20)]
    heldout, train = _split_heldout(texts, tokenizer, 16, 0.2, seed=0)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    by_hand = [tokenizer(texts[i])["input_ids"] for i in order]
    assert heldout._rows(heldout.input_ids, range(4)) == by_hand[:4]
    assert train._rows(train.input_ids, range(16)) == by_hand[4:]
