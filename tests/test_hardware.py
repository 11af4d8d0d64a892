"""One owner of devices and precision (kdexp.hardware): its refusals, its precision, passes split over
processes, and a code base that places nothing by hand."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SENTENCES, SPECIAL, WORDS, make_glue_dir
from transformers import AutoTokenizer

from kdexp.errors import ConfigError
from kdexp.hardware import Hardware, HardwareSpec
from kdexp.tiny_models import save_tiny_model

PACKAGE = REPO / "kdexp"


@pytest.mark.parametrize(
    "spec, key",
    [
        (HardwareSpec(precision="16-mixed"), "trainer.precision=16-mixed needs a GPU"),
        (HardwareSpec(precision="bf16-true"), "trainer.precision=bf16-true is not supported"),
        (HardwareSpec(strategy="ddp_spawn", devices=2), "trainer.strategy=ddp_spawn"),
    ],
)
def test_what_no_stage_can_run_is_refused_in_one_line(spec: HardwareSpec, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        spec.check()
    assert key in str(err.value) and "\n" not in str(err.value)


def test_the_run_config_refuses_16_bit_mixed_precision_on_cpu_before_any_work() -> None:
    from kdexp.run import check_run, compose_config

    with pytest.raises(ConfigError, match="16-mixed needs a GPU"):
        check_run(compose_config(["trainer.precision=16-mixed"]))


def test_precision_decides_the_autocast_of_every_stage() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Hardware(HardwareSpec(precision="bf16-mixed")).inference():
        assert (a @ b).dtype == torch.bfloat16
    with Hardware(HardwareSpec(precision="32-true")).inference():
        assert (a @ b).dtype == torch.float32
    assert Hardware(HardwareSpec(precision="bf16-mixed")).pass_precision == "bf16"
    assert Hardware().pass_precision == "fp32" and Hardware().device == torch.device("cpu")


def test_one_process_shards_nothing_and_combines_nothing() -> None:
    hardware = Hardware()
    assert hardware.shard([[0, 1], [2], [3, 4]]) == [[0, 1], [2], [3, 4]]
    rows = torch.arange(6.0)
    assert hardware.combine_rows(rows) is rows and hardware.all_true(True) and not hardware.all_true(False)


# --------------------------------------------------------------------------- passes over two processes


def run_passes(
    tmp_path: Path, name: str, devices: int, models: tuple[Path, Path], glue: Path, env: dict[str, str]
) -> tuple[dict[str, torch.Tensor], int]:
    """The passes of tests/ddp_passes.py with `devices` processes, and the pid of global rank 0."""
    out, cache = tmp_path / name, tmp_path / f"cache-{name}"
    out.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "ddp_passes.py"),
            str(out),
            str(models[0]),
            str(models[1]),
            str(glue),
            str(cache),
            str(devices),
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return torch.load(out / "passes.pt", weights_only=True), proc.pid


def test_teacher_passes_over_two_processes_equal_one_process_and_only_rank_zero_writes(
    tmp_path: Path, write_audit
) -> None:
    """Logits, [CLS] vectors, DBKD decisions and the MLM top-k store: each process runs every other batch,
    the rows are put back together, and the result is bit for bit the single process's."""
    vocabulary = [*SPECIAL, *WORDS]
    models = (
        save_tiny_model(tmp_path / "teacher", "bert", vocabulary),
        save_tiny_model(tmp_path / "mlm", "bert", vocabulary, head="masked_lm"),
    )
    glue = make_glue_dir(tmp_path / "glue")
    environment, writes = write_audit
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    single, _ = run_passes(tmp_path, "single", 1, models, glue, env)
    ddp, rank_zero = run_passes(tmp_path, "ddp", 2, models, glue, environment(tmp_path / "cache-ddp", env))

    assert set(single) == {"logits", "cls", "decisions", "offsets", "probs", "token_ids"} == set(ddp)
    assert single["decisions"].shape == (len(SENTENCES), 3)
    for name in single:
        assert torch.equal(single[name], ddp[name]), name
    written = writes()
    assert any("/signals/" in path for _, path in written), written
    assert {pid for pid, _ in written} == {rank_zero}, "a process other than global rank 0 wrote to the cache"


def test_a_decoder_teachers_off_label_count_over_two_processes_is_the_whole_querys_count(tmp_path: Path) -> None:
    """Each process counts the off-label answers of its own batches: the combined tally is every query's,
    equal to the single process's and to a count made query by query."""
    from ddp_label_words import label_word_model, queries

    from kdexp.data import pad_batch
    from kdexp.families import multiple_choice

    folder = save_tiny_model(tmp_path / "gpt2", "gpt2", [*SPECIAL, *WORDS], head="causal_lm")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def answers(devices: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"out-{devices}"
        out.mkdir()
        script = [sys.executable, str(REPO / "tests" / "ddp_label_words.py"), str(out), str(folder), str(devices)]
        done = subprocess.run(script, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert done.returncode == 0, done.stdout[-4000:]
        return torch.load(out / "answers.pt", weights_only=True)

    tokenizer = AutoTokenizer.from_pretrained(folder)

    def top_tokens(model: torch.nn.Module) -> list[int]:
        tops = []
        for passage, question, *options in queries():
            prompt = multiple_choice.prompts(
                {"context": [passage], "question": [question], "choices": [options], "label": [0]}, tokenizer, 64
            )
            row = {"input_ids": prompt["input_ids"][0], "attention_mask": prompt["attention_mask"][0], "idx": 0}
            with torch.no_grad():
                output = model(**{k: v for k, v in pad_batch([row], 0).items() if k != "idx"})
            tops.append(int(output.next_token_logits.argmax(-1)))
        return tops

    # A random tiny LM never puts a label word first: give one label word (tied embeddings) the row of the
    # LM's favourite plus another token's, so that it wins the queries whose state leans that way (21 of 30).
    model = label_word_model(str(folder))
    favourite = max(set(tops := top_tokens(model)), key=tops.count)
    with torch.no_grad():
        embeddings = model.lm.get_input_embeddings().weight
        embeddings[model.word_ids[1]] = embeddings[favourite] + embeddings[10]
    model.lm.save_pretrained(folder)
    model = label_word_model(str(folder))
    by_hand = [top not in model.word_ids.tolist() for top in top_tokens(model)]
    assert 0 < sum(by_hand) < len(by_hand), "the tiny model should answer some queries with a label word, not all"

    single, ddp = answers(1), answers(2)
    assert torch.equal(single["decisions"], ddp["decisions"])
    assert int(single["off_label"]) == int(ddp["off_label"]) == sum(by_hand)


# --------------------------------------------------------------------------- nothing placed by hand


DEVICE_NAMES = ("device",)


def placements_by_hand(path: Path) -> list[str]:
    """Calls that put tensors on a device chosen by the module itself: `.cuda()`, `torch.device(...)`,
    `.to(device)` / `.to(self.device)` / `.to("cuda")`. Moving to where an input lives (`.to(x.device)`) or
    back to the CPU is allowed."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        call = f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}"
        if node.func.attr == "cuda" or (node.func.attr == "device" and ast.unparse(node.func.value) == "torch"):
            found.append(call)
        elif node.func.attr == "to" and node.args:
            target = node.args[0]
            chosen = (
                (isinstance(target, ast.Name) and target.id in DEVICE_NAMES)
                or (
                    isinstance(target, ast.Attribute)
                    and target.attr == "device"
                    and ast.unparse(target.value) == "self"
                )
                or (isinstance(target, ast.Constant) and isinstance(target.value, str) and target.value != "cpu")
            )
            if chosen:
                found.append(call)
    return found


def test_no_module_places_tensors_by_hand() -> None:
    """Only kdexp.hardware (and the Lightning Trainer) decide where tensors live; benchmarks' bare loops aside."""
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "hardware.py" and "tools" not in p.parts]
    found = [call for path in modules for call in placements_by_hand(path)]
    assert not found, "\n".join(found)


def test_the_placement_check_sees_what_it_forbids(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "x.to(device)\ny.cuda()\nz = torch.device('cuda')\nw.to(self.device)\nv.to(idx.device)\nu.to('cpu')\n"
    )
    assert [call.split(": ")[1] for call in placements_by_hand(source)] == [
        "x.to(device)",
        "y.cuda()",
        "torch.device('cuda')",
        "w.to(self.device)",
    ]


# --------------------------------------------------------------------------- cached signals travel with the batch


def test_cached_signals_are_no_buffers_and_travel_with_the_batch() -> None:
    from kdexp.teacher import TeacherSignals, batch_rows

    logits = torch.randn(10, 3)
    signals = TeacherSignals(logits=logits, cls=torch.randn(10, 1, 4), cls_layers=[5])
    assert not list(signals.buffers()), "a buffer would be broadcast by DDP at every step"
    batch = {"idx": torch.tensor([7, 2])}
    rows = signals.rows(batch)
    assert torch.equal(rows["teacher_logits"], logits[[7, 2]]) and rows["teacher_cls"].shape == (2, 1, 4)
    assert torch.equal(signals.logits({**batch, **rows}), logits[[7, 2]])
    assert torch.equal(signals.logits(batch), logits[[7, 2]])  # a batch not prepared: looked up on the spot
    assert torch.equal(batch_rows(batch, "teacher_logits", logits), logits[[7, 2]])
    assert torch.equal(signals.cls({**batch, **rows}, 5), rows["teacher_cls"][:, 0])


# --------------------------------------------------------------------------- one GPU per parallel sweep job


def test_parallel_jobs_lease_different_gpus_and_a_killed_job_frees_its_own(tmp_path: Path) -> None:
    from kdexp.hardware import GpuLease, with_leased_gpu

    first, second = GpuLease(3, tmp_path), GpuLease(3, tmp_path)
    assert first.acquire() == 0
    # Another process holds GPU 1 (the OS lock, as a running job would), until it is killed.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, sys, time; h = open(sys.argv[1], 'a'); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True);"
                " time.sleep(60)"
            ),
            str(tmp_path / "gpu-1.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert second.acquire() == 2
    assert with_leased_gpu({"devices": 1, "accelerator": "gpu"})["devices"] == [2]
    holder.kill()
    holder.wait()
    third = GpuLease(3, tmp_path)
    assert third.acquire() == 1  # the killed job's GPU is free again
    first.release()
    assert GpuLease(3, tmp_path).acquire() == 0
    second.release()
    third.release()
    assert with_leased_gpu({"devices": 1}) == {"devices": 1}


def test_the_teacher_stage_fine_tunes_on_the_gpu_the_sweep_job_leased_not_on_gpu_0(tmp_path: Path) -> None:
    """Lightning reads `devices=1` as the first visible GPU: a job that leased GPU 3 would fine-tune the shared
    teacher on GPU 0, another job's. The teacher stage takes the run's own device, as every one-process stage."""
    from kdexp.config import TeacherSchema
    from kdexp.hardware import GpuLease, with_leased_gpu
    from kdexp.teacher_stage import teacher_trainer_options

    others = [GpuLease(4, tmp_path) for _ in range(3)]  # three jobs hold GPUs 0 to 2
    assert [other.acquire() for other in others] == [0, 1, 2]
    lease = GpuLease(4, tmp_path)
    try:
        assert lease.acquire() == 3
        run = with_leased_gpu({"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"})
        hardware = Hardware(HardwareSpec.from_trainer(run))
        options = teacher_trainer_options(TeacherSchema(name_or_path="x"), run, hardware)
        assert options["devices"] == [3] and options["precision"] == "bf16-mixed"
        assert hardware.single_device() is hardware  # known from the keys alone: no GPU is touched
    finally:
        for held in (lease, *others):
            held.release()
    cpu = Hardware(HardwareSpec())
    assert teacher_trainer_options(TeacherSchema(name_or_path="x"), {"accelerator": "cpu"}, cpu)["devices"] == 1


def test_only_parallel_single_gpu_jobs_on_a_machine_with_several_gpus_lease_one() -> None:
    from kdexp.hardware import sweep_job_devices

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert sweep_job_devices({"accelerator": "gpu", "devices": 1}, joblib, gpus=4)
    assert not sweep_job_devices({"accelerator": "gpu", "devices": 1}, joblib, gpus=1)
    assert not sweep_job_devices({"accelerator": "cpu", "devices": 1}, joblib, gpus=4)
    assert not sweep_job_devices({"accelerator": "gpu", "devices": 2}, joblib, gpus=4)
    assert not sweep_job_devices({"accelerator": "gpu", "devices": 1}, "hydra._internal.BasicLauncher", gpus=4)
