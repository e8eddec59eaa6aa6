"""OpenTelemetry (extra ``kameo[otel]``): spans of calls across processes, and metrics.

kameo never sets OpenTelemetry up: it uses what the application set. A pool looks once, when it
starts, and only if the application imported ``opentelemetry`` already (so without it nothing is
imported and nothing is paid): spans need a tracer provider set
(``opentelemetry.trace.set_tracer_provider``), metrics a meter provider. A worker looks once,
after its init hook ran (the place to set up its own provider and exporter).

* **Client spans, in the parent.** Every ask, stream and call (``pool.ask``, ``pool.stream``,
  ``pool.call``, a Ref's methods, a ``map`` batch, a pipeline...) is a span of kind CLIENT named
  ``kameo.<kind> <target>`` (``kameo.ask pkg.mod:f``, ``kameo.pipeline``), a child of the
  caller's current span (or of an explicit ``traceparent=``), with the attributes
  ``rpc.system="kameo"``, ``rpc.method``, ``kameo.pool``, ``kameo.kind``, ``kameo.worker_id``
  and ``process.pid`` of the worker; a failure sets status ERROR, ``error.type`` and records the
  exception. Its context is the traceparent the request carries.
* **Server spans, in the worker** (if the worker has a tracer provider): kind SERVER, the same
  name, a child of the request's traceparent, current while the request runs (spans the handler
  makes are its children, and the traceparent of its callbacks is the server span's).
* **Callback spans, in the parent**: a worker's call of a parent handler
  (``kameo.trading.DataFetch(...)``) is a SERVER span ``kameo.callback trading.DataFetch``,
  a child of the span the worker sent (its server span, or the client span), current while the
  handler runs.
* **Metrics** (meter ``kameo``): counters ``kameo.calls`` and ``kameo.errors`` (attributes
  ``kameo.pool``, ``kameo.kind``, ``rpc.method``, and ``error.type`` for errors), a histogram
  ``kameo.call.duration`` (seconds from the call to its answer), and observable counters
  ``kameo.crashes`` and ``kameo.retries`` (from ``pool.stats()``).
"""

from __future__ import annotations

import sys

from kameo import _error_info
from kameo._lean import suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    import weakref
    from typing import Any

    from kameo.pool import Pool

__all__ = ["PoolTelemetry", "WorkerTelemetry", "for_pool", "for_worker", "traced_channel"]

RPC_SYSTEM = "kameo"


def _imported() -> bool:
    """The application uses OpenTelemetry (kameo never imports it first)."""
    return "opentelemetry.trace" in sys.modules or "opentelemetry.metrics" in sys.modules


def _version() -> str:
    from kameo import __version__

    return __version__


def _tracer() -> Any:
    """kameo's tracer, if a tracer provider is set."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer("kameo", _version())


def traceparent_of(span: Any) -> str:
    """The W3C traceparent of ``span``."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class _Api:
    """The OpenTelemetry names kameo uses, imported once, when a pool or worker first traces
    (never before the application imported opentelemetry)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.in_context = trace.set_span_in_context
        self.client, self.server = SpanKind.CLIENT, SpanKind.SERVER
        self.status, self.error = Status, StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()


_api_loaded: _Api | None = None


def _api() -> _Api:
    global _api_loaded
    if _api_loaded is None:
        _api_loaded = _Api()
    return _api_loaded


def _parent(trace: str | None) -> Any:
    """The context a span made for a request carrying ``trace`` is a child of (None: the
    current one)."""
    if trace is None:
        return None
    return _api().propagator.extract({"traceparent": trace})


def _span_name(kind: str, target: str | None) -> str:
    return f"kameo.{kind}" if target is None else f"kameo.{kind} {target}"


def _fail(span: Any, error_type: str | None, exc: BaseException | None, message: str) -> None:
    """Mark ``span`` failed: ``error.type``, the exception (if here), status ERROR."""
    if error_type:
        span.set_attribute("error.type", error_type)
    if exc is not None:
        span.record_exception(exc)
    api = _api()
    span.set_status(api.status(api.error, message))


# ---------------------------------------------------------------------------- the parent


class _Metrics:
    """kameo's instruments on the global meter provider (made once per provider).

    Only the histogram is recorded per request: the counters are observable, read when the
    application's reader collects, from counts each pool keeps (a dict increment per request,
    where a counter's ``add`` costs as much as the histogram's ``record``).
    """

    def __init__(self, meter: Any) -> None:
        from opentelemetry.metrics import Observation

        self.duration = meter.create_histogram(
            "kameo.call.duration", unit="s", description="from the call to its answer"
        )
        import weakref  # parent side (a worker imports this module without it)

        self.pools: weakref.WeakSet[Pool] = weakref.WeakSet()

        def telemetry() -> list[PoolTelemetry]:
            return [t for t in (p._otel for p in list(self.pools)) if t is not None]

        def calls(_options: Any) -> Any:
            for t in telemetry():
                for (kind, method), n in list(t.calls.items()):
                    yield Observation(n, t.attributes(kind, method))

        def errors(_options: Any) -> Any:
            for t in telemetry():
                for (kind, method, error_type), n in list(t.errors.items()):
                    yield Observation(n, {**t.attributes(kind, method), "error.type": error_type})

        def observe(field: str) -> Any:
            def callback(_options: Any) -> Any:
                for pool in list(self.pools):
                    yield Observation(getattr(pool.stats(), field), {"kameo.pool": pool._name})

            return callback

        meter.create_observable_counter(
            "kameo.calls", callbacks=[calls], unit="{call}", description="requests that ended"
        )
        meter.create_observable_counter(
            "kameo.errors", callbacks=[errors], unit="{call}", description="requests that failed"
        )
        meter.create_observable_counter(
            "kameo.crashes",
            callbacks=[observe("crashes")],
            unit="{worker}",
            description="workers that died while serving",
        )
        meter.create_observable_counter(
            "kameo.retries",
            callbacks=[observe("retries")],
            unit="{call}",
            description="idempotent requests run again after a crash",
        )


_metrics: tuple[Any, _Metrics] | None = None  # (the provider, its instruments)


def _metrics_for_provider() -> _Metrics | None:
    global _metrics
    try:
        from opentelemetry import metrics
    except ImportError:
        return None
    provider = metrics.get_meter_provider()
    if type(provider).__name__ in ("_ProxyMeterProvider", "NoOpMeterProvider"):
        return None
    if _metrics is None or _metrics[0] is not provider:
        _metrics = (provider, _Metrics(provider.get_meter("kameo", _version())))
    return _metrics[1]


class PoolTelemetry:
    """The spans and metrics of one pool's requests and callbacks."""

    __slots__ = ("_attributes", "calls", "errors", "metrics", "pool", "tracer")

    def __init__(self, pool: str, tracer: Any, metrics: _Metrics | None) -> None:
        self.pool = pool
        self.tracer = tracer
        self.metrics = metrics
        # Requests that ended, by (kind, rpc.method); failed ones by (kind, method, error type).
        self.calls: dict[tuple[str, str], int] = {}
        self.errors: dict[tuple[str, str, str], int] = {}
        self._attributes: dict[tuple[str, str], dict[str, str]] = {}

    def attributes(self, kind: str, method: str) -> dict[str, str]:
        """The metric attributes of requests of ``kind`` to ``method`` (one dict for each)."""
        key = (kind, method)
        attrs = self._attributes.get(key)
        if attrs is None:
            attrs = self._attributes[key] = {
                "kameo.pool": self.pool,
                "kameo.kind": kind,
                "rpc.method": method,
            }
        return attrs

    def start(
        self, kind: str, target: str | None, explicit: str | None, trace: str | None
    ) -> tuple[Any, str | None]:
        """A client span for a request about to be sent, and the traceparent it carries: a
        child of ``explicit`` (the caller's ``traceparent=``) if given, else of the current
        span. Without a tracer: no span, and ``trace``."""
        tracer = self.tracer
        if tracer is None:
            return None, trace
        span = tracer.start_span(
            _span_name(kind, target),
            context=_parent(explicit),
            kind=_api().client,
            attributes={
                "rpc.system": RPC_SYSTEM,
                "rpc.method": target or kind,
                "kameo.pool": self.pool,
                "kameo.kind": kind,
            },
        )
        return span, traceparent_of(span)

    def finish(
        self,
        span: Any,
        kind: str,
        target: str | None,
        worker: tuple[int, int | None] | None,
        seconds: float | None,
        error_type: str | None,
        exc: BaseException | None,
    ) -> None:
        """A request ended (``worker``: its (id, pid), ``seconds`` from the call to the end,
        ``error_type`` None if it succeeded)."""
        metrics = self.metrics
        if metrics is not None:
            method = target or kind
            key = (kind, method)
            calls = self.calls
            calls[key] = calls.get(key, 0) + 1
            if seconds is not None:
                metrics.duration.record(seconds, self.attributes(kind, method))
            if error_type is not None:
                errors, failed = self.errors, (kind, method, error_type)
                errors[failed] = errors.get(failed, 0) + 1
        if span is None:
            return
        if worker is not None:
            if worker[1] is not None:
                span.set_attributes({"kameo.worker_id": worker[0], "process.pid": worker[1]})
            else:
                span.set_attribute("kameo.worker_id", worker[0])
        if error_type is not None:
            _fail(span, error_type, exc, f"{error_type}: {exc}" if exc is not None else error_type)
        span.end()

    def callback_start(self, path: str, worker: tuple[int, int | None], trace: str | None) -> Any:
        """A span for a worker's call of the parent handler ``path``: (span, its traceparent,
        the context to run the handler in), or None without a tracer."""
        tracer = self.tracer
        if tracer is None:
            return None
        attributes = {
            "rpc.system": RPC_SYSTEM,
            "rpc.method": path,
            "kameo.pool": self.pool,
            "kameo.kind": "callback",
            "kameo.worker_id": worker[0],
        }
        if worker[1] is not None:
            attributes["process.pid"] = worker[1]
        span = tracer.start_span(
            _span_name("callback", path),
            context=_parent(trace),
            kind=_api().server,
            attributes=attributes,
        )
        return span, traceparent_of(span), _api().in_context(span)

    @staticmethod
    def callback_end(span: Any, exc: BaseException | None) -> None:
        if exc is not None:
            _fail(span, type(exc).__name__, exc, f"{type(exc).__name__}: {exc}")
        span.end()


def for_pool(name: str, pool: Pool) -> PoolTelemetry | None:
    """The pool's telemetry if the application set OpenTelemetry up, else None."""
    if not _imported():
        return None
    tracer, metrics = _tracer(), _metrics_for_provider()
    if tracer is None and metrics is None:
        return None
    if metrics is not None:
        metrics.pools.add(pool)
    return PoolTelemetry(name, tracer, metrics)


def attach(ctx: Any) -> None:
    """Make ``ctx`` (an OpenTelemetry context) current (in the running contextvars context)."""
    _api().context.attach(ctx)


# ---------------------------------------------------------------------------- the worker


class WorkerTelemetry:
    """Server spans of the requests one worker runs (one at a time per request id)."""

    __slots__ = ("attributes", "spans", "tracer")

    def __init__(self, tracer: Any, pool: str, worker_id: int, pid: int) -> None:
        self.tracer = tracer
        self.attributes = {
            "rpc.system": RPC_SYSTEM,
            "kameo.pool": pool,
            "kameo.worker_id": worker_id,
            "process.pid": pid,
        }
        # request id -> (span, the token of its context)
        self.spans: dict[int, tuple[Any, Any]] = {}

    def start(self, rid: int, kind: str, target: str | None, trace: str | None) -> str:
        """Start request ``rid``'s server span and make it current; its traceparent."""
        api = _api()
        span = self.tracer.start_span(
            _span_name(kind, target),
            context=_parent(trace),
            kind=api.server,
            attributes={**self.attributes, "rpc.method": target or kind, "kameo.kind": kind},
        )
        token = api.context.attach(api.in_context(span))
        self.spans[rid] = (span, token)
        return traceparent_of(span)

    def failed(self, rid: int, info: Any) -> None:
        """Request ``rid`` answers with the error ``info`` (an error-info dict)."""
        entry = self.spans.get(rid)
        if entry is None or not isinstance(info, dict):
            return
        span = entry[0]
        kind = info.get(_error_info.KIND)
        name = info.get(_error_info.TYPE) or ("CancelledError" if kind == "cancelled" else kind)
        name = str(name).removeprefix("builtins.")
        message = info.get(_error_info.MESSAGE) or ""
        tb = info.get(_error_info.TRACEBACK)
        # The exception is gone (sent as text): its event is made from the info, as
        # record_exception would make it.
        span.add_event(
            "exception",
            {
                "exception.type": name,
                "exception.message": str(message),
                "exception.stacktrace": str(tb or ""),
            },
        )
        _fail(span, name, None, f"{name}: {message}")

    def end(self, rid: int) -> None:
        entry = self.spans.pop(rid, None)
        if entry is None:
            return
        span, token = entry
        with suppress(Exception):  # the span ends even if the context moved
            _api().context.detach(token)
        span.end()


def for_worker(pool: str, worker_id: int, pid: int) -> WorkerTelemetry | None:
    """The worker's telemetry, if its process set a tracer provider up (its init hook, or an
    instrumentation loaded at start), else None."""
    if not _imported():
        return None
    tracer = _tracer()
    return None if tracer is None else WorkerTelemetry(tracer, pool, worker_id, pid)


class _TracedChannel:
    """A worker's channel whose errors also mark the request's server span failed: every
    public attribute is the channel's own (bound once), but :meth:`error`."""

    def __init__(self, chan: Any, otel: WorkerTelemetry) -> None:
        for name in dir(chan):
            if not name.startswith("_") and name != "error":
                setattr(self, name, getattr(chan, name))
        self._error = chan.error
        self._otel = otel

    def error(self, rid: int, info: Any) -> Any:
        self._otel.failed(rid, info)
        return self._error(rid, info)


def traced_channel(chan: Any, otel: WorkerTelemetry) -> Any:
    return _TracedChannel(chan, otel)
