"""Every benchmark and tool of kdexp/tools imports and answers `--help` (they are not run by other tests)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import kdexp.tools

TOOLS = sorted(name for _, name, _ in pkgutil.iter_modules(kdexp.tools.__path__))


def test_the_tools_are_all_listed() -> None:
    assert {"benchmark", "internal_benchmark", "pass_benchmark", "peer_benchmark", "scale_benchmark"} <= set(TOOLS)


@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_imports_and_answers_help(name: str) -> None:
    module = importlib.import_module(f"kdexp.tools.{name}")
    assert callable(getattr(module, "main", None)), f"kdexp.tools.{name} has no main()"
    proc = subprocess.run(
        [sys.executable, "-m", f"kdexp.tools.{name}", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]
