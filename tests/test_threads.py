"""Sync handlers in a worker's threads: ``max_concurrency=n`` with a sync handler runs up to n
requests of one worker at once, in parallel on a free-threaded interpreter (3.13t)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig

import kameo
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


async def test_two_sync_requests_of_one_worker_run_at_once() -> None:
    # Each request waits at a barrier for the other: they pass only when both run at once.
    async with kameo.Pool("handlers.threads:spin_and_meet", size=1, max_concurrency=2) as p:
        a, b = await asyncio.wait_for(
            asyncio.gather(p.ask({"n": 200_000}), p.ask({"n": 200_000})), timeout=60
        )
    assert a["thread"] != b["thread"]
    assert a["total"] == b["total"] == 0
    assert a["gil"] == b["gil"] == (not FREE_THREADED)


async def test_one_at_a_time_without_max_concurrency() -> None:
    # With max_concurrency=1 the second request waits for the first: the first breaks its
    # barrier (after its timeout) instead of meeting the second.
    async with kameo.Pool("handlers.threads:spin_and_meet", size=1) as p:
        with pytest.raises(kameo.RemoteError) as err:
            await asyncio.wait_for(p.ask({"n": 1000, "wait": 0.5}), timeout=60)
    assert err.value.remote_type == "threading.BrokenBarrierError"


GIL_PROBE = """
import asyncio, sys
import kameo

async def main():
    async with kameo.Pool("handlers.threads:where", size=2) as pool:
        info = await pool.ask(None)
    print(sys._is_gil_enabled(), info["gil"], info["free_threaded_build"])

asyncio.run(main())
"""


@pytest.mark.skipif(not FREE_THREADED, reason="needs a free-threaded interpreter (3.13t)")
def test_the_gil_stays_off_in_parent_and_workers() -> None:
    # Without PYTHON_GIL=0 (which would force it off), so that importing an extension module
    # that does not declare free-threading support would turn the GIL back on.
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", GIL_PROBE],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"], out.stdout + out.stderr
