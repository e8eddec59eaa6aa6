//! The parent's worker connections as the extension instantiates them: `kameo_core::link`
//! (socket, frame reader, output buffer, requests in flight) with a Python waiter per request.

use pyo3::prelude::*;

/// Who waits for the answer to a request.
pub enum Target {
    /// `ask`: an asyncio future resolved with the reply; true if it has a timeout timer
    /// (its `_kameo_timer`), cancelled when it is resolved.
    Ask(Py<PyAny>, bool),
    /// `stream`: items go to the core's stream buffer of the same id.
    Stream,
}

/// One worker connection of the Python parent.
pub type Link = kameo_core::link::Link<Target>;
/// A request in flight on a [`Link`].
pub type Slot = kameo_core::link::Slot<Target>;
