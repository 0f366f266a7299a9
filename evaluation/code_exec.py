"""Run model-written code against its tests, only when the user has opted in.

Executing generated code is the one place where selfmoe runs untrusted input. It happens only
when both switches are on (lm-eval's ``confirm_run_unsafe_code``, checked by the runner before
any generation, and ``HF_ALLOW_CODE_EVAL=1``, checked here and by the runner). Each program runs
in a fresh ``python -I`` subprocess, in an empty temporary directory, with a minimal
environment, a wall-clock timeout and CPU/memory/file-size limits. That contains accidents, not
attacks: run code benchmarks inside a container or VM (see the README, "Reliability").
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from selfmoe.errors import SelfMoEError

ALLOW_ENV = "HF_ALLOW_CODE_EVAL"
TIMEOUT_S = 5.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 1 << 20


def code_eval_allowed() -> bool:
    """True when the environment opts in to executing model-written code."""
    return os.environ.get(ALLOW_ENV) == "1"


def require_code_eval() -> None:
    """Refuse, naming both switches, unless ``HF_ALLOW_CODE_EVAL=1`` is set."""
    if not code_eval_allowed():
        raise SelfMoEError(
            f"this task executes model-written code; set {ALLOW_ENV}=1 and eval.confirm_run_unsafe_code=true "
            "to allow it (preferably inside a container or VM), or leave code tasks out of the suite."
        )


def _limits() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (int(TIMEOUT_S) + 1, int(TIMEOUT_S) + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    os.setsid()  # its own process group: the timeout kills everything it spawned


def passes(program: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether ``program`` (solution + tests) exits 0 within ``timeout`` seconds."""
    require_code_eval()
    with tempfile.TemporaryDirectory(prefix="selfmoe-code-") as work:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": work}
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", program],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                preexec_fn=_limits if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def pass_at_1(programs: Sequence[str]) -> float:
    """Fraction of ``programs`` that pass (greedy decoding: one sample each, so pass@1)."""
    return sum(passes(p) for p in programs) / len(programs) if programs else 0.0
