"""The context variables both sides read: no imports beyond the standard library.

The worker sets them for the request it runs, the parent for the callback handler it runs;
``kameo.current_traceparent()`` reads :data:`traceparent` on either side.
"""

from __future__ import annotations

import contextvars

__all__ = ["current_request", "session", "traceparent"]

#: The W3C traceparent of the request being handled (worker) or of the callback being
#: handled (parent); read it with ``kameo.current_traceparent()``.
traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kameo_traceparent", default=None
)
#: Worker side: the id of the request being handled, so that the callbacks it makes are tied to
#: it (0 outside a request).
current_request: contextvars.ContextVar[int] = contextvars.ContextVar("kameo_request", default=0)
#: Worker side: the id of the session the running call belongs to (None outside a session);
#: read it with ``kameo.current_session()``.
session: contextvars.ContextVar[str | None] = contextvars.ContextVar("kameo_session", default=None)
