"""Worker ``logging`` records reach the parent's logging (kameo._worker_log), real workers."""

from __future__ import annotations

import logging
from pathlib import Path

import kameo
import pytest
from conftest import async_wait_until, wait_until

LOGS = "handlers.logs"
BOUND = 15.0


def records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


async def wait_records(
    caplog: pytest.LogCaptureFixture, name: str, n: int
) -> list[logging.LogRecord]:
    assert await async_wait_until(lambda: len(records(caplog, name)) >= n, BOUND), caplog.text
    return records(caplog, name)


async def test_records_keep_their_logger_level_message_and_get_extras(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with kameo.Pool(f"{LOGS}:levels", size=1, name="logs") as pool:
        wid = pool.workers[0].id
        seen = await pool.ask("x", timeout=10)
        app = await wait_records(caplog, "kameo_test.app", 2)
        (lib,) = await wait_records(caplog, "kameo_test.lib.connectionpool", 1)
    # The worker's loggers had the parent's levels: its DEBUG record was never made.
    assert seen["app_debug"] is False and seen["app_info"] is True
    assert seen["root"] == logging.INFO
    assert [(r.levelno, r.getMessage()) for r in app] == [
        (logging.INFO, "info x"),
        (logging.WARNING, "warning x"),
    ]
    assert (lib.levelno, lib.getMessage()) == (logging.ERROR, "library error x")
    for r in [*app, lib]:
        assert (r.worker_id, r.pid, r.pool) == (wid, seen["pid"], "logs")  # type: ignore[attr-defined]
        assert r.process == seen["pid"] and r.processName == f"logs w{wid}"
        assert r.filename == "logs.py" and r.funcName == "levels"
    assert "warning x" in caplog.text
    # Records are not also printed by the worker (as raw stderr lines of kameo.worker).
    assert not [r for r in records(caplog, "kameo.worker") if "warning x" in r.getMessage()]


async def test_a_parent_logger_level_reaches_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="kameo_test.app")
    async with kameo.Pool(f"{LOGS}:levels", size=1) as pool:
        seen = await pool.ask("y", timeout=10)
        app = await wait_records(caplog, "kameo_test.app", 3)
        await wait_records(caplog, "kameo_test.lib.connectionpool", 1)
    assert seen["app_debug"] is True and seen["root"] == logging.WARNING
    assert [r.getMessage() for r in app] == ["debug y", "info y", "warning y"]


async def test_exception_and_stack_text(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with kameo.Pool(f"{LOGS}:failing", size=1) as pool:
        assert await pool.ask("k", timeout=10) == "logged"
        failed, stacked = await wait_records(caplog, "kameo_test.app", 2)
    assert failed.levelno == logging.ERROR
    assert failed.getMessage() == "lookup of 'k' failed"
    assert failed.exc_text is not None
    assert "Traceback (most recent call last)" in failed.exc_text
    assert "KeyError: 'k'" in failed.exc_text
    assert "KeyError: 'k'" in caplog.text  # formatters show it as they show a local one
    assert stacked.stack_info is not None and "Stack (most recent call last)" in stacked.stack_info


async def test_an_async_worker_forwards_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with kameo.Pool(f"{LOGS}:alog", size=1, max_concurrency=4) as pool:
        assert await pool.ask("a", timeout=10) == "logged"
        (record,) = await wait_records(caplog, "kameo_test.app", 1)
    assert record.getMessage() == "async a"


async def test_records_logged_while_importing_come_before_the_startup_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(kameo.WorkerStartupError, match="does not import"):
        await kameo.Pool("handlers.logs_at_import:f", size=1).start()
    (record,) = records(caplog, "kameo_test.import")  # already there: no wait
    assert record.getMessage() == "importing, about to fail"


async def test_a_burst_does_not_block_the_handler_and_drops_with_a_count(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING)
    n = 100_000
    done = tmp_path / "done"
    # Frequent heartbeats: their thread writes too, while the socket is full.
    opts = {"heartbeat_interval": 0.05, "heartbeat_timeout": 120}
    async with kameo.Pool(f"{LOGS}:burst", size=1, **opts) as pool:
        reply = pool.ask({"n": n, "done": str(done)})  # written at once: the worker is idle
        # This loop now reads nothing from the worker: the socket fills up. A handler whose
        # logging waited for the parent would never get to the end of its burst.
        assert wait_until(done.exists, 30), "the handler blocked while logging"
        assert await reply == n

        def accounted() -> tuple[int, int]:
            got = sum(1 for r in records(caplog, "kameo_test.app") if "burst" in r.msg)
            dropped = sum(getattr(r, "dropped", 0) for r in records(caplog, "kameo.worker"))
            return got, dropped

        assert await async_wait_until(lambda: sum(accounted()) == n, BOUND), accounted()
    got, dropped = accounted()
    assert dropped > 0 and got > 0, (got, dropped)
    warning = next(r for r in records(caplog, "kameo.worker") if getattr(r, "dropped", 0))
    assert "dropped" in warning.getMessage() and warning.levelno == logging.WARNING
    # what arrived is the burst's beginning, in order
    burst = [r.getMessage() for r in records(caplog, "kameo_test.app")]
    assert burst[:3] == ["burst 0", "burst 1", "burst 2"]


async def test_the_worker_logs_nothing_the_parent_would_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with kameo.Pool(f"{LOGS}:levels", size=1) as pool:
        seen = await pool.ask("z", timeout=10)
        await wait_records(caplog, "kameo_test.lib.connectionpool", 1)
    assert seen["app_info"] is False
    assert not records(caplog, "kameo_test.app")


async def test_records_still_buffered_at_close_arrive(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    n = 20_000
    async with kameo.Pool(f"{LOGS}:burst", size=1) as pool:
        assert await pool.ask({"n": n}, timeout=30) == n
        # closed at once: most of the burst still waits in the worker's buffer
    got = sum(1 for r in records(caplog, "kameo_test.app") if "burst" in r.msg)
    dropped = sum(getattr(r, "dropped", 0) for r in records(caplog, "kameo.worker"))
    assert got + dropped == n, (got, dropped)
    async with kameo.Pool(f"{LOGS}:alog", size=1) as pool:
        await pool.ask("last", timeout=10)
    assert [r for r in records(caplog, "kameo_test.app") if r.getMessage() == "async last"]


async def test_a_broken_log_frame_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kameo")
    async with kameo.Pool("handlers.crashy:cmd", size=1) as pool:
        pid = pool.workers[0].pid
        # an empty LOG body: not an encoded value
        reply = await pool.ask({"op": "unknown_frame", "kind": kameo._native.Channel.LOG})
        assert reply["pid"] == pid
        assert await async_wait_until(lambda: "could not be decoded" in caplog.text, BOUND)
        assert await pool.ask({"op": "echo", "value": 1}, timeout=10) == 1
        assert [w.pid for w in pool.workers] == [pid] and pool.stats().crashes == 0


async def test_forwarding_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with kameo.Pool(f"{LOGS}:levels", size=1, forward_logs=False) as pool:
        seen = await pool.ask("z", timeout=10)
        # Python's own last-resort handler writes the worker's warning to its stderr.
        assert await async_wait_until(
            lambda: any("warning z" in r.getMessage() for r in records(caplog, "kameo.worker")),
            BOUND,
        ), caplog.text
    assert not records(caplog, "kameo_test.app")
    assert seen["root"] == logging.WARNING  # the worker's default, not the parent's INFO


async def test_a_worker_imports_logging_only_when_its_code_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker whose code does not log imports neither logging nor what it pulls in; once the
    code imports logging, its records reach the parent with the parent's levels."""
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.DEBUG, logger="kameo_test.late")
    async with kameo.Pool("handlers.logs_late:imported", size=1) as pool:
        assert await pool.ask(None, timeout=10) == []
        level = await pool.call("handlers.logs_late:log_now", "z")
        late = await wait_records(caplog, "kameo_test.late", 2)
        assert await pool.ask(None, timeout=10) == ["logging", "traceback"]
    assert level == logging.DEBUG  # the parent's level, set when logging was imported
    assert [r.getMessage() for r in late] == ["debug z", "warning z"]
