//! W3C trace context for calls: the traceparent a call sends to its worker (the worker's
//! `kameo.current_traceparent()`, and the parent of its OpenTelemetry spans). The caller's own
//! (`CallOptions::traceparent`), or a new one when the call's `tracing` span is recorded.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random bits (SipHash of a counter under a random key: unique, unpredictable enough for
/// trace ids; never zero).
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish().max(1)
}

/// The traceparent to send with a call whose span is `span`, recorded in it.
pub(crate) fn traceparent(given: Option<&str>, span: &tracing::Span) -> Option<String> {
    let tp = match given {
        Some(tp) => tp.to_string(),
        None if span.is_disabled() => return None,
        None => format!("00-{:016x}{:016x}-{:016x}-01", random(), random(), random()),
    };
    span.record("traceparent", tp.as_str());
    Some(tp)
}
