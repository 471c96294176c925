"""Run peer-library benchmark jobs from the project's venv.

The peer libraries (Surprise, LensKit, cornac) live in their own virtualenv
(``bash benchmarks/peers/setup.sh``).  This module runs
``benchmarks/peers/run_peer.py`` with that venv's interpreter in a subprocess and
returns the JSON object it prints::

    from benchmarks.peers.client import peers_available, run_peer

    if peers_available():
        result = run_peer({"task": "fold", "peer": "surprise-svd",
                           "train": ".../u1.base", "test": ".../u1.test"})
        print(result["rmse"], result["fit_seconds"])

Ranking peers (``cornac-bpr``, ``lenskit-implicitmf``) run as ``rank`` jobs: they save one
score matrix per run (``.npy``, users x items in the order given) and the caller computes the
metrics with its own code (``benchmarks/ranking_vs_peers.py``)::

    result = run_peer({"task": "rank", "peer": "cornac-bpr", "train": ".../u1.base",
                       "users": [1, 2, 3], "items": [1, 2, 50],
                       "runs": [{"params": {"k": 64}, "out": "/tmp/bpr.npy"}]})
    print(result["runs"][0]["fit_seconds"])

The peers' interpreter is, in order: the ``python`` argument,
``$RECSYS_PEERS_PYTHON``, ``<repo>/.venv-peers/bin/python`` (or
``$RECSYS_PEERS_VENV/bin/python``), then ``/work/peers-venv/bin/python``.
Only the standard library is used here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["PeerError", "find_peers_python", "peers_available", "run_peer"]

RUN_PEER = Path(__file__).resolve().with_name("run_peer.py")
REPO_ROOT = RUN_PEER.parents[2]
FALLBACK_PEERS_PYTHON = Path("/work/peers-venv/bin/python")
SETUP_HINT = "run `bash benchmarks/peers/setup.sh` to create the peers' virtualenv"
_STDERR_TAIL_CHARS = 4000
_PROBE = "import surprise, lenskit, cornac, numpy, pandas"


class PeerError(RuntimeError):
    """A peer job could not be run, or it failed."""


def _default_venv() -> Path:
    venv = Path(os.environ.get("RECSYS_PEERS_VENV", ".venv-peers"))
    return venv if venv.is_absolute() else REPO_ROOT / venv


def _candidates(python: str | None) -> list[tuple[str, Path]]:
    """Interpreters to try, each with where it came from, in order of preference."""
    if python is not None:
        return [("python argument", Path(python))]
    env = os.environ.get("RECSYS_PEERS_PYTHON")
    if env:
        return [("$RECSYS_PEERS_PYTHON", Path(env))]
    return [
        ("peers venv", _default_venv() / "bin" / "python"),
        ("shared peers venv", FALLBACK_PEERS_PYTHON),
    ]


def find_peers_python(python: str | None = None) -> Path:
    """The peers' interpreter: ``python`` if given, else the first one that exists.

    An explicit ``python`` or ``$RECSYS_PEERS_PYTHON`` is used as given (and must
    exist); otherwise the repo's ``.venv-peers`` is preferred over
    ``/work/peers-venv``.

    Raises:
        PeerError: no candidate interpreter exists.
    """
    candidates = _candidates(python)
    for _, path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    tried = ", ".join(f"{path} ({origin})" for origin, path in candidates)
    raise PeerError(f"no peers' python found (tried {tried}); {SETUP_HINT}")


def peers_available(python: str | None = None) -> bool:
    """Whether a peers' interpreter exists and imports Surprise, LensKit and cornac."""
    try:
        exe = find_peers_python(python)
    except PeerError:
        return False
    try:
        probe = subprocess.run(
            [str(exe), "-c", _PROBE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _STDERR_TAIL_CHARS else "..." + text[-_STDERR_TAIL_CHARS:]


def run_peer(
    job: dict[str, Any], *, python: str | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run one job (see ``run_peer.py``) with the peers' interpreter and return its result.

    Args:
        job: the job object, e.g. ``{"task": "fold", "peer": "cornac-mf",
            "train": PATH, "test": PATH}``.
        python: the peers' interpreter; see :func:`find_peers_python`.
        timeout: seconds before the subprocess is killed.

    Raises:
        PeerError: no interpreter, a timeout, a non-zero exit, or output that is
            not one JSON object; the message carries the tail of the job's stderr.
    """
    exe = find_peers_python(python)
    payload = json.dumps(job)
    # The project venv's import paths must not leak into the peers' interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        proc = subprocess.run(
            [str(exe), str(RUN_PEER)],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = (
            exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        )
        raise PeerError(
            f"peer job timed out after {timeout:.0f} s: {payload}\n{_tail(stderr or '')}"
        ) from exc
    except OSError as exc:
        raise PeerError(f"cannot run {exe}: {exc}; {SETUP_HINT}") from exc

    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result: Any = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    if proc.returncode != 0 or not isinstance(result, dict) or "error" in result:
        reason = (
            result["error"]
            if isinstance(result, dict) and "error" in result
            else f"exit status {proc.returncode}"
        )
        hint = f"; {SETUP_HINT}" if "ModuleNotFoundError" in proc.stderr else ""
        raise PeerError(
            f"peer job failed ({reason}) with {exe}: {payload}{hint}\n"
            f"--- stderr tail ---\n{_tail(proc.stderr)}"
        )
    return result
