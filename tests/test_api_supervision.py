"""A worker whose supervisor is gone stops (api/supervision.py)."""

import asyncio
import os

import pytest

from api.supervision import SUPERVISOR_ENV, stop_when_orphaned, supervisor_pid


def test_a_worker_keeps_serving_while_its_parent_is_the_supervisor():
    stopped = []

    async def watch_briefly():
        task = asyncio.create_task(stop_when_orphaned(os.getppid(), interval_s=0.01, stop=lambda: stopped.append(1)))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()

    asyncio.run(watch_briefly())
    assert stopped == []


def test_a_worker_whose_parent_is_not_the_supervisor_any_more_stops_at_once():
    stopped = []
    not_the_parent = os.getppid() + 1 if os.getppid() + 1 != os.getpid() else os.getppid() + 2
    asyncio.run(asyncio.wait_for(stop_when_orphaned(not_the_parent, interval_s=0.01, stop=lambda: stopped.append(1)),
                                 timeout=5))
    assert stopped == [1]


def test_the_supervisor_pid_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(SUPERVISOR_ENV, raising=False)
    assert supervisor_pid() is None
    monkeypatch.setenv(SUPERVISOR_ENV, "4321")
    assert supervisor_pid() == 4321
    monkeypatch.setenv(SUPERVISOR_ENV, "abc")
    with pytest.raises(ValueError, match="RECSYS_SUPERVISOR_PID must be a process id, got 'abc'"):
        supervisor_pid()
