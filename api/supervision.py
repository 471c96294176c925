"""Workers stop when their supervisor dies.

``recsys serve --workers N`` runs uvicorn's supervisor process, which spawns the N workers
that answer requests. When the supervisor is killed without a chance to stop them (SIGKILL,
the OOM killer, a crash), uvicorn's workers are orphaned and keep serving: the port stays
taken, a restarted server cannot bind it, and the orphans keep writing to the store under a
configuration nobody manages any more. So ``recsys serve`` names itself in
``RECSYS_SUPERVISOR_PID`` and every worker's lifespan runs `stop_when_orphaned`, which
checks twice a second that its parent is still that process and otherwise asks its own
server to shut down gracefully (SIGTERM: uvicorn finishes the requests in flight, the app
closes the store; nothing acknowledged is lost, since acknowledged ratings are committed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger("recsys.api")

#: the environment variable ``recsys serve`` sets to its own pid for its workers
SUPERVISOR_ENV = "RECSYS_SUPERVISOR_PID"


def supervisor_pid() -> int | None:
    """The supervisor's pid from `SUPERVISOR_ENV`, or None when this process has none (a
    single-process server, tests)."""
    raw = os.environ.get(SUPERVISOR_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{SUPERVISOR_ENV} must be a process id, got {raw!r}")
    return int(raw)


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


async def stop_when_orphaned(supervisor: int, interval_s: float = 0.5,
                             stop: Callable[[], None] = _terminate_self) -> None:
    """Call ``stop`` (default: SIGTERM to this process, uvicorn's graceful shutdown) as soon
    as this process's parent is no longer ``supervisor``, checking every ``interval_s``
    seconds; return after stopping, or run until cancelled."""
    while True:
        parent = os.getppid()
        if parent != supervisor:
            log.error("the supervisor (pid %d) is gone (parent now %d): worker %d shuts down",
                      supervisor, parent, os.getpid())
            stop()
            return
        await asyncio.sleep(interval_s)
