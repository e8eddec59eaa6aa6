//! `kameo._native`: the Rust core of kameo, exposed to Python. What needs no Python (spawning,
//! frame I/O, shared memory, scheduling, stream credit) is in `kameo-core`, shared with the Rust
//! host; this crate adds the Python side of it.
//!
//! * [`codec`]: serde_py, Python values to and from the wire encoding.
//! * [`core`]: the parent's pool core (connections, reply slots, request queue).
//! * [`channel`]: the worker's end of the connection.
//! * [`spawn`]: starting worker processes (`kameo_core::spawn`, the GIL released).

mod channel;
mod codec;
mod core;
mod errors;
mod frames;
mod link;
mod pool;
mod shm;
mod spawn;

use kameo_core::{events, wait};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

fn options(allow_pickle: bool) -> codec::Options {
    codec::Options {
        allow_pickle,
        ..codec::Options::INLINE
    }
}

/// Encode a Python value with kameo's codec (inline; no shared memory).
#[pyfunction]
#[pyo3(signature = (obj, *, allow_pickle=false))]
fn encode<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    allow_pickle: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    codec::encode_to_bytes(obj, &options(allow_pickle))
        .map_err(|e| errors::serialization(py, e.describe("value")))
}

/// Decode bytes produced by [`encode`].
#[pyfunction]
#[pyo3(signature = (data, *, allow_pickle=false))]
fn decode<'py>(py: Python<'py>, data: &[u8], allow_pickle: bool) -> PyResult<Bound<'py, PyAny>> {
    codec::decode(py, data, &options(allow_pickle), &[])
        .map_err(|e| errors::serialization(py, format!("cannot decode: {e}")))
}

/// Register a subclass of a built-in type (str, int, float, complex, bytes, bytearray, list,
/// tuple, dict, set, frozenset) so that its instances arrive as instances of it rather than of
/// the base type. Returns the class, so it can decorate the class statement.
#[pyfunction]
fn register_type<'py>(cls: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    codec::register_type(cls)?;
    Ok(cls.clone())
}

/// Make exact instances of `cls` (kameo.Ref) travel as remote object references: its
/// `_wid`, `_num`, `_type` (and `_key`, checked by the parent) are read when one is encoded.
#[pyfunction]
fn set_ref_type(cls: &Bound<'_, PyAny>) -> PyResult<()> {
    codec::set_ref_type(cls)
}

/// Wait for `fd` (a socket registered in the event loop's epoll set `loop_fd`) to be readable
/// while nothing else of the loop's is ready, for at most `timeout` seconds (at most 1), with the
/// GIL released: see [`wait::wait_alone`]. The worker's async server calls it when a handler
/// awaits a callback's item and the loop has nothing else to run.
#[pyfunction]
fn wait_alone(py: Python<'_>, fd: i32, loop_fd: i32, timeout: f64) -> bool {
    let ts = wait::timeout(timeout);
    py.detach(|| wait::wait_alone(fd, loop_fd, wait::spin(), &ts))
}

/// The real decoder over arbitrary bytes, for the fuzz target `fuzz/fuzz_targets/py_decode.rs`
/// (not part of the Python API): decode inline without pickle; when that succeeds, encode the
/// value again and decode that. Errors are fine; a panic or a crash is the bug.
#[doc(hidden)]
pub fn fuzz_decode(py: Python<'_>, data: &[u8]) {
    let opts = options(false);
    let Ok(value) = codec::decode(py, data, &opts, &[]) else {
        return;
    };
    // A value the decoder built may still be refused by the encoder (e.g. a dataclass given
    // only some of its fields), but whatever the encoder writes must decode.
    if let Ok(again) = codec::encode_to_vec(&value, &opts) {
        if let Err(e) = codec::decode(py, &again, &opts, &[]) {
            panic!("kameo decoded {data:?}, encoded it as {again:?}, and cannot decode that: {e}");
        }
    }
}

#[pymodule]
mod _native {
    #[pymodule_export]
    use super::channel::Channel;
    #[pymodule_export]
    use super::core::PoolCore;
    #[pymodule_export]
    use super::decode;
    #[pymodule_export]
    use super::encode;
    #[pymodule_export]
    use super::register_type;
    #[pymodule_export]
    use super::set_ref_type;
    #[pymodule_export]
    use super::spawn::{die_with_parent, kill_own_group, spawn_worker, worker_fds};
    #[pymodule_export]
    use super::wait_alone;

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("PROTOCOL_VERSION", kameo_proto::PROTOCOL_VERSION)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        for (name, value) in super::events::ALL {
            m.add(format!("EVENT_{name}").as_str(), value)?;
        }
        Ok(())
    }
}
