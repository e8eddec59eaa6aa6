"""Sync handlers in a worker's threads: ``max_concurrency=n`` with a sync handler runs up to n
requests of one worker at once, in parallel on a free-threaded interpreter (3.13t)."""

from __future__ import annotations

import asyncio
import sys
import sysconfig

import kameo
import pytest

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


async def test_two_sync_requests_of_one_worker_run_at_once() -> None:
    # Each request waits at a barrier for the other: they pass only when both run at once.
    async with kameo.Pool("tests.handlers.threads:spin_and_meet", size=1, max_concurrency=2) as p:
        a, b = await asyncio.wait_for(
            asyncio.gather(p.ask({"n": 200_000}), p.ask({"n": 200_000})), timeout=60
        )
    assert a["thread"] != b["thread"]
    assert a["total"] == b["total"] == 0
    assert a["gil"] == b["gil"] == (not FREE_THREADED)


async def test_one_at_a_time_without_max_concurrency() -> None:
    # With max_concurrency=1 the second request waits for the first: the first breaks its
    # barrier (after its timeout) instead of meeting the second.
    async with kameo.Pool("tests.handlers.threads:spin_and_meet", size=1) as p:
        with pytest.raises(kameo.RemoteError) as err:
            await asyncio.wait_for(p.ask({"n": 1000, "wait": 0.5}), timeout=60)
    assert err.value.remote_type == "threading.BrokenBarrierError"


@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter (3.13t)")
async def test_the_gil_stays_off_in_parent_and_workers() -> None:
    assert not sys._is_gil_enabled()  # kameo._native is imported: it did not turn the GIL on
    async with kameo.Pool("tests.handlers.threads:where", size=2) as p:
        info = await p.ask(None)
    assert info["free_threaded_build"] and not info["gil"]
