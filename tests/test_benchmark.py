"""The throughput benchmark on a tiny BERT: every variant measured, ratios are ratios of its medians."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdexp.tools.benchmark import main


def test_benchmark_measures_every_variant_and_reports_ratios_of_medians(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bench.json"
    main(
        [
            f"teacher.name_or_path={tiny_model_dir}",
            "teacher.epochs=1",
            f"data.glue_dir={glue_dir}",
            "data.batch_size=4",
            "data.max_length=32",
            f"cache_dir={tmp_path / 'cache'}",
            "trainer.enable_progress_bar=false",
            "--repeats",
            "2",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    speeds = result["examples_per_second"]
    assert set(speeds) == {"finetune", "vanilla_kd", "vanilla_kd_live_teacher", "bare_loop"}
    for name, samples in result["samples"].items():
        assert len(samples) == 2 and all(s > 0 for s in samples)
        assert speeds[name] == pytest.approx(sorted(samples)[0] / 2 + sorted(samples)[1] / 2)  # median of two
    assert result["ratios"]["vanilla_kd / finetune"] == pytest.approx(speeds["vanilla_kd"] / speeds["finetune"])
    assert result["ratios"]["kdexp finetune / bare PyTorch loop"] == pytest.approx(
        speeds["finetune"] / speeds["bare_loop"]
    )
    assert set(result["peak_memory_mb"]) == set(speeds)
    assert "vanilla_kd / finetune" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available() or not Path("/proc/self/clear_refs").exists(), reason="Linux CPU RSS")
def test_peak_memory_sees_a_large_temporary_allocation() -> None:
    # A fresh process: in a long-lived test worker, malloc may serve 64 MB from heap pages that are already resident.
    code = (
        "import torch\n"
        "from kdexp.tools.benchmark import PeakMemory\n"
        "with PeakMemory() as peak:\n"
        "    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched\n"
        "    del block\n"
        "print(peak.megabytes)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 60 <= float(result.stdout.strip().splitlines()[-1]) <= 200


def test_pass_benchmark_measures_kdexp_passes_against_bare_loops_that_agree_with_them(
    tiny_model_dir: Path, glue_dir: Path, tmp_path: Path
) -> None:
    from kdexp.tools.pass_benchmark import main as pass_main

    out = tmp_path / "passes.json"
    pass_main(
        [
            f"teacher.name_or_path={tiny_model_dir}",
            "teacher.epochs=1",
            f"data.glue_dir={glue_dir}",
            "data.max_length=32",
            f"cache_dir={tmp_path / 'cache'}",
            "--repeats",
            "1",
            "--num-queries",
            "3",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["queries"] == 3 * result["rows"]
    assert result["agreement"]["logits_max_abs_difference"] < 1e-5  # the same logits, other batches
    assert result["agreement"]["decisions_equal_fraction"] == 1.0
    speeds = result["rows_per_second"]
    assert result["ratios"]["kdexp logits pass / bare length-sorted loop"] == pytest.approx(
        speeds["logits_kdexp"] / speeds["logits_bare_sorted"]
    )
