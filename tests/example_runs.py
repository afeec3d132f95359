"""Running the examples in tests: imported as modules, or launched with ``fmi run``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

from tests.helpers import REPO


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as a module (its coroutines run on local peers)."""
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fmi_run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``fmi run ARGV`` from the repository's root, output captured; asserts it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "fmi_async", "run", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
