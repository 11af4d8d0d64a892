"""DBKD and the decision-only baselines: the decision-only teacher, the query stage and its cache,
the losses and targets, the refusals, configs, and one full tiny run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import BertForSequenceClassification

from kdexp.config import OptimConfig
from kdexp.data import DataSource, load_split
from kdexp.decision.eda import EDAConfig, augment, augment_pair, example_random
from kdexp.decision.estimator import estimate_logits_from_counts
from kdexp.decision.queries import (
    DecisionQueries,
    QueryConfig,
    augmentation_key,
    decision_statistics,
    decisions_key,
    examples_of,
    query_decisions,
)
from kdexp.decision.teacher import DecisionTeacher
from kdexp.hardware import Hardware
from kdexp.methods.dbkd import (
    DBKD,
    DecisionDistillation,
    DecisionHard,
    DecisionHardAug,
    DecisionLabelSmooth,
    DecisionNoiseSmooth,
)
from kdexp.run import ConfigError, build_context, compose_config, method_options, resolve_method, run
from kdexp.tasks import get_task
from kdexp.teacher import Teacher
from kdexp.train import CONFIG_DIR
from tests.conftest import tiny_bert_config, tiny_tokenizer
from tests.test_pipeline import tiny_cfg

DECISION_METHODS = (
    "dbkd",
    "decision_hard",
    "decision_hard_aug",
    "decision_noise_smooth",
    "decision_label_smooth",
    "decision_surrogate",
)
# Only the word-level operations the tiny vocabulary can take (RI would insert WordNet words).
NO_WORDNET = {"eda": {"random_insertion": False, "random_swap": True, "random_deletion": True}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only wait on each other
    (measured: 0.75 s against 0.01 s per tiny forward under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def word_count_teacher(num_labels: int = 2, calls: list | None = None) -> DecisionTeacher:
    """A stand-in black box whose decision changes under augmentation: (number of words) mod C."""

    def decide(queries):
        if calls is not None:
            calls.append(len(queries))
        words = [len(q.split()) if isinstance(q, str) else len(q[0].split()) + 2 * len(q[1].split()) for q in queries]
        return torch.tensor([w % num_labels for w in words], dtype=torch.long)

    return DecisionTeacher(decide, key="word-count", num_labels=num_labels, identity={"rule": "words mod C"})


def tiny_teacher(tmp_path: Path, task_name: str = "sst2", seed: int = 3) -> Teacher:
    torch.manual_seed(seed)
    path = tmp_path / f"teacher-{task_name}"
    BertForSequenceClassification(tiny_bert_config(num_labels=get_task(task_name).num_labels)).save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    return Teacher(
        str(path), "tiny-key", get_task(task_name), tokenizer, tmp_path / "cache", Hardware(), eval_batch_size=5
    )


# --------------------------------------------------------------------------- the decision-only teacher


def test_decision_teacher_answers_argmax_labels_and_exposes_no_logits(tmp_path: Path) -> None:
    teacher = tiny_teacher(tmp_path)
    decider = DecisionTeacher.from_teacher(teacher, max_length=32)
    texts = ["the movie is good", "a bad movie", "dull", "the plot is great and fun", "not fun", "it is"]
    labels = decider.decide(texts)
    assert labels.dtype == torch.long and labels.shape == (len(texts),)

    model = teacher.load_model()
    tok = teacher.tokenizer
    with torch.no_grad():
        expected = [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    assert labels.tolist() == expected
    assert decider.queries_answered == len(texts)

    # Nothing but labels is reachable: no __dict__, no logits, no model or tokenizer attribute.
    assert not hasattr(decider, "__dict__")
    assert not hasattr(decider, "logits")
    public = [name for name in dir(decider) if not name.startswith("_")]
    assert [n for n in public if callable(getattr(decider, n)) and n != "from_teacher"] == ["decide"]
    for name in DecisionTeacher.__slots__:
        value = getattr(decider, name)
        assert not isinstance(value, (torch.nn.Module, torch.Tensor)), name
        assert "Tokenizer" not in type(value).__name__


def test_decision_teacher_refuses_float_answers() -> None:
    leaky = DecisionTeacher(lambda queries: torch.zeros(len(queries), 2), key="k", num_labels=2)
    with pytest.raises(TypeError, match="integer labels"):
        leaky.decide(["a", "b"])


# --------------------------------------------------------------------------- the query stage


@pytest.mark.parametrize("task_name", ["sst2", "rte"])
def test_query_counts_equal_a_brute_force_loop(glue_dir: Path, tmp_path: Path, task_name: str) -> None:
    task = get_task(task_name)
    ds = load_split(task, "train", DataSource(glue_dir))
    config = QueryConfig(num_queries=5, seed=7)  # the paper's EDA: RI, RS, RD (WordNet for RI)
    decider = word_count_teacher()
    result = query_decisions(decider, ds, task, config, tmp_path / "cache")

    expected_counts, expected_decisions = [], []
    for i, example in enumerate(examples_of(ds, task)):
        rng = example_random(7, i)
        if isinstance(example, str):
            inputs = [example, *augment(example, 4, rng, config.eda)]
        else:
            inputs = [example, *augment_pair(example[0], example[1], 4, rng, config.eda)]
        row = [int(decider.decide([x])[0]) for x in inputs]  # one query at a time
        expected_decisions.append(row)
        expected_counts.append(torch.bincount(torch.tensor(row), minlength=2).tolist())
    assert result.decisions.tolist() == expected_decisions
    assert result.counts.tolist() == expected_counts
    assert (result.counts.sum(1) == 5).all()
    assert 0 < (result.counts.max(1).values < 5).sum() < len(ds), "the test needs rows that agree and rows that do not"
    # The stored copies are the queries that were asked, row-major.
    copies = result.copies()
    assert len(copies) == len(ds) * 4
    assert list(copies["row"])[:5] == [0, 0, 0, 0, 1] and list(copies["copy"])[:5] == [1, 2, 3, 4, 1]


def test_query_counts_with_a_real_tiny_model_match_single_queries(glue_dir: Path, tmp_path: Path) -> None:
    task = get_task("sst2")
    ds = load_split(task, "train", DataSource(glue_dir))
    teacher = tiny_teacher(tmp_path)
    config = QueryConfig(num_queries=4, seed=1, batch_size=3, eda=EDAConfig(random_insertion=False))
    result = query_decisions(
        DecisionTeacher.from_teacher(teacher, 32, config.batch_size), ds, task, config, tmp_path / "c"
    )
    model, tok = teacher.load_model(), teacher.tokenizer
    copies = list(result.copies()["sentence"])
    for i, sentence in enumerate(ds["sentence"]):
        inputs = [sentence] + copies[3 * i : 3 * i + 3]
        with torch.no_grad():
            row = [int(model(**tok(x, return_tensors="pt")).logits.argmax(-1)) for x in inputs]
        assert result.decisions[i].tolist() == row


def test_authors_style_counts_cleaned_text_and_the_baselines_decide_on_the_raw_input(
    glue_dir: Path, tmp_path: Path
) -> None:
    from kdexp.decision.eda import clean_text

    task = get_task("sst2")
    ds = load_split(task, "train", DataSource(glue_dir)).map(  # every other row with a score, as reviews have
        lambda row, i: {"sentence": row["sentence"] + (" , 10/10 !" if i % 2 else "")}, with_indices=True
    )
    asked: list[str] = []

    def as_it_stands(text: str) -> int:  # the decision: 1 for a text that cleaning would change
        return int(text != (clean_text(text) or text))

    def decide(queries: list) -> torch.Tensor:
        asked.extend(queries)
        return torch.tensor([as_it_stands(q) for q in queries])

    config = QueryConfig(num_queries=4, seed=0, eda=EDAConfig(style="authors"))
    result = query_decisions(DecisionTeacher(decide, key="words", num_labels=2), ds, task, config, tmp_path)
    # Per row: the N counted queries (the cleaned text, then 3 cleaned copies), then the text as it stands.
    assert len(asked) == 5 * len(ds)
    assert asked[0::5] == [clean_text(s) or s for s in ds["sentence"]]
    assert asked[4::5] == list(ds["sentence"])
    counted = [q for i, q in enumerate(asked) if i % 5 != 4]
    assert all(q == clean_text(q) for q in counted if clean_text(q))
    assert result.decisions.shape == (len(ds), 4)
    assert result.decisions[:, 0].tolist() == [0] * len(ds)
    raw = [as_it_stands(s) for s in ds["sentence"]]
    assert result.original_decisions.tolist() == raw
    assert 0 < sum(raw) < len(ds), "the slice needs rows that cleaning changes and rows it leaves"
    stats = decision_statistics(result, torch.tensor(raw))
    assert stats["teacher_train_accuracy"] == 1.0 and stats["teacher_queries"] == 5 * len(ds)

    asked.clear()
    warm = query_decisions(DecisionTeacher(decide, key="words", num_labels=2), ds, task, config, tmp_path)
    assert asked == [] and warm.from_cache
    assert torch.equal(warm.original_decisions, result.original_decisions)
    assert torch.equal(warm.decisions, result.decisions)


def test_query_stage_is_cached_and_reused_and_keyed_by_its_settings(glue_dir: Path, tmp_path: Path) -> None:
    task = get_task("sst2")
    ds = load_split(task, "train", DataSource(glue_dir))
    cache = tmp_path / "cache"
    calls: list[int] = []
    config = QueryConfig(num_queries=4, seed=0)
    first = query_decisions(word_count_teacher(calls=calls), ds, task, config, cache)
    assert calls == [len(ds) * 4] and not first.from_cache

    second = query_decisions(
        word_count_teacher(calls=calls), ds, task, QueryConfig(num_queries=4, seed=0, batch_size=2), cache
    )
    assert calls == [len(ds) * 4], "the second query stage asked the teacher again"
    assert second.from_cache and second.key == first.key and torch.equal(second.decisions, first.decisions)
    assert second.query_seconds == pytest.approx(first.query_seconds)

    base_aug = augmentation_key(ds, task, config)
    variants = [
        QueryConfig(num_queries=5, seed=0),
        QueryConfig(num_queries=4, seed=1),
        QueryConfig(num_queries=4, seed=0, eda=EDAConfig(synonym_replacement=True)),
        QueryConfig(num_queries=4, seed=0, eda=EDAConfig(rate_scale=0.2)),
        QueryConfig(num_queries=4, seed=0, eda=EDAConfig(random_swap=False)),
        QueryConfig(num_queries=4, seed=0, eda=EDAConfig(style="authors")),
        QueryConfig(num_queries=4, seed=0, eda=EDAConfig(style="authors", rows_per_draw=2)),
    ]
    keys = {augmentation_key(ds, task, v) for v in variants}
    assert base_aug not in keys and len(keys) == len(variants)
    assert augmentation_key(ds.select(range(6)), task, config) != base_aug
    # Another teacher: same augmented copies, new decisions.
    other = DecisionTeacher(lambda q: torch.zeros(len(q), dtype=torch.long), key="other", num_labels=2)
    assert decisions_key(other, base_aug) != first.key
    third = query_decisions(other, ds, task, config, cache)
    assert third.augmentation_key == first.augmentation_key and not third.from_cache and third.key != first.key
    changed = query_decisions(word_count_teacher(calls=calls), ds, task, QueryConfig(num_queries=4, seed=2), cache)
    assert not changed.from_cache and len(calls) == 2


def test_query_config_from_options_refuses_unknown_keys() -> None:
    assert QueryConfig.from_options({"num_queries": 3, "eda": {"random_swap": False}}).eda.random_swap is False
    with pytest.raises(TypeError, match="num_querys"):
        QueryConfig.from_options({"num_querys": 3})
    with pytest.raises(TypeError, match="queries.eda"):
        QueryConfig.from_options({"eda": {"swap": True}})
    with pytest.raises(ValueError, match="num_queries"):
        QueryConfig(num_queries=0)


# --------------------------------------------------------------------------- losses and targets


def fake_queries(decisions: list[list[int]], num_labels: int) -> DecisionQueries:
    return DecisionQueries(torch.tensor(decisions), num_labels, "k", "a", Path("/nonexistent"), True)


def fake_run(num_labels: int = 2) -> SimpleNamespace:
    torch.manual_seed(0)
    task = get_task("sst2" if num_labels == 2 else "mnli")
    config = tiny_bert_config(num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SimpleNamespace(student=BertForSequenceClassification(config), task=task, optim=OptimConfig())


def a_batch(rows: list[int], num_labels: int = 2) -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer()
    enc = tok(
        ["the movie is good", "a bad film", "not fun !", "great plot"][: len(rows)], padding=True, return_tensors="pt"
    )
    return {**enc, "labels": torch.tensor([1, 0, 1, 0][: len(rows)]) % num_labels, "idx": torch.tensor(rows)}


def test_dbkd_loss_is_the_paper_formula() -> None:
    decisions = [[0] * 10, [0] * 7 + [1] * 3, [1] * 5 + [0] * 5, [1] * 9 + [0]]
    queries = fake_queries(decisions, 2)
    options = method_options("dbkd", alpha=0.5, temperature=2.0, logit_scale=2.0, noise_std=1.5)
    module = DBKD.from_decisions(fake_run(), queries, {}, options)
    z_hat = estimate_logits_from_counts(queries.counts, noise_std=1.5)
    assert torch.allclose(module.estimated_logits, z_hat.float())

    batch = a_batch([3, 1, 0])
    loss, parts = module.training_loss(batch)
    logits = module(batch).float()
    t, a, s = 2.0, 0.5, 2.0
    p = torch.softmax(s * z_hat[batch["idx"]].float() / t, dim=-1)
    log_q = torch.log_softmax(logits / t, dim=-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    ce = F.cross_entropy(logits, batch["labels"])
    assert loss.item() == pytest.approx((ce + a * t * t * kl).item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_dbkd_estimates_each_distinct_count_vector_once_and_logs_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdexp.decision.estimator as estimator

    solved = []
    original = estimator.solve_logits

    def spy(p_hat, *args, **kwargs):
        solved.append(p_hat.shape[0])
        return original(p_hat, *args, **kwargs)

    monkeypatch.setattr(estimator, "solve_logits", spy)
    decisions = [[0] * 10, [1] * 10, [0] * 7 + [1] * 3, [1] * 7 + [0] * 3, [0] * 7 + [1] * 3]
    stats: dict = {}
    module = DBKD.from_decisions(fake_run(), fake_queries(decisions, 2), stats, method_options("dbkd"))
    assert solved == [2]  # (10, 0) and (7, 3)
    assert stats["estimator_solved_vectors"] == 2 and stats["all_agree_margin"] > 0
    assert torch.allclose(module.estimated_logits[0], module.estimated_logits[1].flip(0))
    assert torch.allclose(module.estimated_logits[2], module.estimated_logits[4])


def test_baseline_targets() -> None:
    decisions = [[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]]
    queries = fake_queries(decisions, 2)
    hard = DecisionHard.from_decisions(fake_run(), queries, {}, method_options("decision_hard"))
    assert hard.targets.tolist() == [[0, 1], [1, 0], [1, 0]]  # top-1 on the original input (column 0)
    noise = DecisionNoiseSmooth.from_decisions(fake_run(), queries, {}, method_options("decision_noise_smooth"))
    assert torch.allclose(noise.targets, torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.25, 0.75]]))
    smooth = DecisionLabelSmooth.from_decisions(fake_run(), queries, {}, method_options("decision_label_smooth"))
    assert torch.allclose(smooth.targets, torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.9, 0.1]]))
    three = DecisionLabelSmooth.from_decisions(
        fake_run(3), fake_queries([[2, 0], [0, 0]], 3), {}, method_options("decision_label_smooth", smoothing=0.2)
    )
    assert torch.allclose(three.targets, torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))

    # Each baseline's loss is DBKD's with its own target: CE + a·T²·KL(q || student).
    batch = a_batch([0, 1, 2])
    for module in (hard, noise, smooth):
        loss, _ = module.training_loss(batch)
        logits = module(batch).float()
        q = module.targets[batch["idx"]]
        kl = F.kl_div(torch.log_softmax(logits, -1), q, reduction="batchmean")
        assert loss.item() == pytest.approx((F.cross_entropy(logits, batch["labels"]) + 0.7 * kl).item(), rel=1e-5)
    # Hard at T = 1: CE(gold) + a·CE(teacher label).
    loss, _ = hard.training_loss(batch)
    logits = hard(batch).float()
    teacher_labels = torch.tensor([1, 0, 0])
    assert loss.item() == pytest.approx(
        (F.cross_entropy(logits, batch["labels"]) + 0.7 * F.cross_entropy(logits, teacher_labels)).item(), rel=1e-5
    )


def test_authors_label_smoothing_spreads_over_all_classes_and_sharpens_by_temperature() -> None:
    queries = fake_queries([[1, 0], [0, 0]], 2)
    plain = DecisionLabelSmooth.from_decisions(
        fake_run(), queries, {}, method_options("decision_label_smooth", smoothing_form="uniform")
    )
    assert torch.allclose(plain.targets, torch.tensor([[0.05, 0.95], [0.95, 0.05]]))  # (1 - eps)·onehot + eps/C
    sharp = DecisionLabelSmooth.from_decisions(
        fake_run(), queries, {}, method_options("decision_label_smooth", smoothing_form="uniform", temperature=2.0)
    )
    root = [0.05**0.5, 0.95**0.5]  # q^(1/T), renormalised, by hand
    expected = torch.tensor([[root[0], root[1]], [root[1], root[0]]]) / sum(root)
    assert torch.allclose(sharp.targets, expected)


def test_hard_aug_loss_has_no_gold_term_for_copies() -> None:
    module = DecisionHardAug(
        fake_run().student,
        get_task("sst2"),
        options=method_options("decision_hard_aug", alpha=0.7),
        targets=torch.eye(2)[[1, 0, 0, 1]],
        num_original=2,
    )
    batch = a_batch([0, 3, 2, 1])
    loss, parts = module.training_loss(batch)
    logits = module(batch).float()
    ce = F.cross_entropy(logits, batch["labels"], reduction="none")
    kd = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0]))
    assert parts["ce"].item() == pytest.approx(((ce[0] + ce[3]) / 4).item(), rel=1e-5)
    assert loss.item() == pytest.approx(((ce[0] + ce[3]) / 4 + 0.7 * kd).item(), rel=1e-5)


# --------------------------------------------------------------------------- refusals


def test_regression_task_is_refused_before_the_teacher_stage(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    for method in DECISION_METHODS:
        cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "task=stsb", f"method={method}")
        with pytest.raises(ConfigError, match=rf"method '{method}'.*regression task stsb"):
            run(cfg, tmp_path / "r")
    assert not (tmp_path / "cache" / "teachers").exists()  # nothing was trained
    assert not (tmp_path / "r").exists()


def test_a_student_from_the_finetuned_teacher_is_refused_before_the_teacher_stage(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    for method in DECISION_METHODS:
        cfg = tiny_cfg(
            tiny_model_dir, glue_dir, tmp_path / "cache", f"method={method}", "student.from_finetuned_teacher=true"
        )
        with pytest.raises(ConfigError, match=rf"'{method}'.*from_finetuned_teacher=true.*white-box"):
            run(cfg, tmp_path / "r")
    assert not (tmp_path / "cache" / "teachers").exists()  # refused before any teacher fine-tuning
    assert not (tmp_path / "r").exists()


def test_unknown_option_is_refused_before_the_teacher_stage(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=decision_hard", "+method.logit_scale=2")
    with pytest.raises(ConfigError, match=r"method.logit_scale is not a config key of method 'decision_hard'"):
        run(cfg, tmp_path / "r")
    assert not (tmp_path / "cache" / "teachers").exists()


# --------------------------------------------------------------------------- configs


def test_decision_method_configs_share_one_query_block_and_name_their_class() -> None:
    blocks = {}
    for method in DECISION_METHODS:
        yaml_file = yaml.safe_load((Path(CONFIG_DIR) / "method" / f"{method}.yaml").read_text())
        assert "/method_parts/decision_queries@queries" in str(yaml_file["defaults"])  # included, not pasted
        cfg = compose_config([f"method={method}"]).method
        blocks[method] = OmegaConf.to_container(cfg.queries)
        assert cfg.name == method
        cls, options = resolve_method(cfg)
        assert issubclass(cls, DecisionDistillation) and cls.method_name == method
        assert set(cfg) - {"name", "_target_"} == {f.name for f in dataclasses.fields(cls.Options)}, method
        assert options.alpha == 0.7 and options.temperature == 1.0
    assert all(block == blocks["dbkd"] for block in blocks.values())
    assert blocks["dbkd"]["num_queries"] == 10 and blocks["dbkd"]["eda"]["synonym_replacement"] is False
    assert QueryConfig.from_options(blocks["dbkd"]) == QueryConfig()  # the yaml and the query stage's defaults agree


def test_experiment_configs() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        glue = compose(config_name="config", overrides=["experiment=dbkd_glue"], return_hydra_config=True)
        cpu = compose(
            config_name="config", overrides=["experiment=dbkd_cpu", "method=decision_hard"], return_hydra_config=True
        )
    assert glue.teacher.name_or_path == "bert-base-uncased" and glue.student.init == "first_layers"
    assert glue.student.num_layers == 4 and not glue.student.from_finetuned_teacher
    assert (
        glue.trainer.max_epochs,
        glue.optim.learning_rate,
        glue.data.batch_size,
        glue.data.max_length,
        glue.optim.warmup_ratio,
    ) == (10, 2e-5, 32, 128, 0.1)
    assert glue.method.name == "dbkd"
    grid = {k: v.split(",") for k, v in glue.hydra.sweeper.params.items()}
    assert grid == {
        "method.alpha": ["0.2", "0.5", "0.7"],
        "method.temperature": ["1", "2", "4"],
        "method.logit_scale": ["0.5", "1", "2", "4"],
    }
    assert cpu.method.name == "decision_hard" and cpu.teacher.name_or_path == "minilm-l6"
    assert cpu.teacher.max_train_samples == 2000 and cpu.data.max_length == 128 and cpu.optim.learning_rate == 5e-4
    assert set(cpu.hydra.sweeper.params.method.split(",")) == {
        "dbkd",
        "dbkd_authors",
        "decision_hard_teacher",
        "decision_hard_aug",
        "decision_noise_smooth",
        "decision_label_smooth_uniform",
        "decision_surrogate",
        "vanilla_kd_additive",
    }


@pytest.mark.parametrize(
    "method, target, options",
    [
        ("vanilla_kd_additive", "kdexp.methods.vanilla_kd.VanillaKD", {"kd_form": "additive", "alpha": 0.5}),
        ("decision_hard_teacher", "kdexp.methods.dbkd.DecisionHard", {"ce_weight": 0.0, "alpha": 1.0}),
        ("decision_label_smooth_uniform", "kdexp.methods.dbkd.DecisionLabelSmooth", {"smoothing_form": "uniform"}),
        ("dbkd_authors", "kdexp.methods.dbkd.DBKD", {"zero_count_rule": "authors", "alpha": 0.7}),
    ],
)
def test_paper_form_configs_are_their_base_method_with_the_authors_options(
    method: str, target: str, options: dict
) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={method}"])
    assert cfg.method.name == method and cfg.method._target_ == target
    assert {key: cfg.method[key] for key in options} == options


# --------------------------------------------------------------------------- a full tiny run


def test_full_tiny_dbkd_run_sees_no_logits_and_hard_aug_reuses_its_queries(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logits_calls: list[str] = []
    in_method: list[bool] = [False]
    original_logits = Teacher.logits

    def spy_logits(self, data, split):
        assert not in_method[0], "a decision method asked the teacher for logits"
        logits_calls.append(split)
        return original_logits(self, data, split)

    captured = {}
    original_from_run = DBKD.from_run.__func__

    def spy_from_run(cls, context, options):
        in_method[0] = True
        try:
            module = original_from_run(cls, context, options)
        finally:
            in_method[0] = False
        captured.update(context=context, module=module)
        return module

    monkeypatch.setattr(Teacher, "logits", spy_logits)
    monkeypatch.setattr(DBKD, "from_run", classmethod(spy_from_run))
    queries = ["method.queries.num_queries=3", "method.queries.eda.random_insertion=false"]
    cfg = tiny_cfg(tiny_model_dir, glue_dir, tmp_path / "cache", "method=dbkd", "trainer.max_epochs=1", *queries)
    results = run(cfg, tmp_path / "run")

    assert (tmp_path / "run" / "results.json").exists() and results["method"] == "dbkd"
    assert "train" not in logits_calls  # only the dev-set report of the teacher's own score
    module = captured["module"]
    float_buffers = {
        n
        for n, b in module.named_buffers()
        if b.is_floating_point() and not n.startswith(("student.", "eval_metrics."))
    }
    assert float_buffers == set()  # per-row signals stay on the CPU, out of the buffers DDP broadcasts
    float_tables = {k for k, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert float_tables == {"estimated_logits"}
    assert not any(
        isinstance(v, (torch.nn.Module, DecisionTeacher)) for k, v in vars(module).items() if k not in ("_modules",)
    )
    assert set(dict(module.named_children())) == {"student", "eval_metrics"}
    stats = json.loads((tmp_path / "run" / "decision_stats.json").read_text())
    assert results["method_info"] == stats  # the report finds the query-stage numbers in results.json
    assert stats["teacher_queries"] == 12 * 3 and not stats["from_cache"] and stats["estimator_seconds"] >= 0

    # decision_hard_aug on the same context: same cached decisions (no teacher query), copies added.
    context = captured["context"]
    monkeypatch.setattr(DecisionTeacher, "decide", lambda self, q: (_ for _ in ()).throw(AssertionError("queried")))
    original_train = context.data.train
    options = method_options("decision_hard_aug", **{"queries.num_queries": 3, "queries.eda.random_insertion": False})
    module = DecisionHardAug.from_run(context, options)
    train = context.data.train
    n = len(original_train)
    assert len(train) == 3 * n and list(train["idx"]) == list(range(3 * n)) and module.num_original == n
    assert list(train["labels"])[:n] == list(original_train["labels"])
    aug_stats = json.loads((context.run_dir / "decision_stats.json").read_text())
    assert aug_stats["from_cache"] and aug_stats["extra_examples"] == 2 * n
    config = QueryConfig(num_queries=3, eda=EDAConfig(random_insertion=False))
    decider = DecisionTeacher.from_teacher(context.teacher, context.data.max_length)
    decided = query_decisions(decider, context.data.raw["train"], context.task, config, context.data.cache_dir)
    assert decided.from_cache
    assert module.targets[:n].argmax(1).tolist() == decided.decisions[:, 0].tolist()
    assert module.targets[n:].argmax(1).tolist() == decided.decisions[:, 1:].reshape(-1).tolist()
    assert (
        list(train["labels"])[n:] == decided.decisions[:, 1:].reshape(-1).tolist()
    )  # a copy's label: the teacher's decision
    tok = context.data.tokenizer
    copies = decided.copies()
    for j in (0, 1, len(copies) - 1):
        expected = tok(copies[j]["sentence"], truncation=True, max_length=context.data.max_length)["input_ids"]
        assert train[n + j]["input_ids"] == expected


def test_surrogate_learns_the_teachers_decisions_deterministically_and_gives_softmax_targets(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from kdexp.decision.surrogate import SurrogateSettings, logits_of, train_surrogate
    from kdexp.inference import PassBatching

    tokenizer = tiny_tokenizer()
    texts = ["the movie is good", "a bad film", "great fun", "an awful plot", "good and great", "dull and bad"] * 2
    decisions = torch.tensor([1, 0, 1, 0, 1, 0] * 2)  # what a teacher said: learnable from the words
    tokenized = datasets.Dataset.from_dict({**tokenizer(texts), "idx": list(range(len(texts)))})
    torch.manual_seed(0)
    student = BertForSequenceClassification(tiny_bert_config(num_layers=2))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    settings = SurrogateSettings(
        epochs=30, learning_rate=3e-3, batch_size=4, weight_decay=0.0, warmup_ratio=0.0, seed=5
    )
    logits = [
        logits_of(
            train_surrogate(student, tokenized, decisions, 0, settings, Hardware()),
            tokenized,
            0,
            2,
            Hardware(),
            PassBatching(64, 4),
        )
        for _ in range(2)
    ]
    assert torch.equal(logits[0], logits[1])  # same settings and seed, same surrogate
    assert torch.equal(logits[0].argmax(-1), decisions)  # it learned the decisions
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student is untouched


def test_a_tiny_surrogate_run_distils_from_softmax_of_the_cached_surrogate_logits(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    queries = ["method.queries.num_queries=2", "method.queries.eda.random_insertion=false"]
    cfg = tiny_cfg(
        tiny_model_dir,
        glue_dir,
        tmp_path / "cache",
        "method=decision_surrogate",
        "trainer.max_epochs=1",
        "method.temperature=2.0",
        *queries,
    )
    results = run(cfg, tmp_path / "run")
    assert 0.0 <= results["method_info"]["surrogate_agreement_with_teacher"] <= 1.0
    [stored] = list((tmp_path / "cache" / "signals" / "surrogate_logits").glob("*.pt"))
    logits = torch.load(stored, weights_only=True)["tensors"]["logits"]
    context, cls, options = build_context(cfg, tmp_path / "again")
    module = cls.from_run(context, options)  # the second build reads the cache
    assert torch.allclose(module.targets, torch.softmax(logits / 2.0, dim=-1))
    assert len(list((tmp_path / "cache" / "signals" / "surrogate_logits").glob("*.pt"))) == 1
