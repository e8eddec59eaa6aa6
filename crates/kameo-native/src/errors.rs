//! Raising the exceptions of `kameo.errors` (defined in Python, so that they can subclass the
//! right built-ins and carry rich attributes) from Rust.

use pyo3::prelude::*;

/// The exception `module.<name>(*args)` returns (a class, or a function that builds one).
fn call<'py>(
    py: Python<'py>,
    module: &Bound<'py, pyo3::types::PyString>,
    name: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyErr {
    match py
        .import(module)
        .and_then(|m| m.getattr(name))
        .and_then(|f| f.call1(args))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// Build an instance of `kameo.errors.<name>(*args)`.
pub fn make<'py>(py: Python<'py>, name: &str, args: impl pyo3::call::PyCallArgs<'py>) -> PyErr {
    call(py, pyo3::intern!(py, "kameo.errors"), name, args)
}

/// The exception for a worker's ERROR frame: `kameo._error_info.from_worker(info, worker_id,
/// pid)`, where the error-info format is decoded.
pub fn from_worker<'py>(
    py: Python<'py>,
    info: Bound<'py, PyAny>,
    worker_id: u32,
    pid: u32,
) -> PyErr {
    call(
        py,
        pyo3::intern!(py, "kameo._error_info"),
        "from_worker",
        (info, worker_id, pid),
    )
}

/// `kameo.errors.<name>(message)`.
pub fn err(py: Python<'_>, name: &str, message: impl Into<String>) -> PyErr {
    make(py, name, (message.into(),))
}

pub fn serialization(py: Python<'_>, message: impl Into<String>) -> PyErr {
    err(py, "SerializationError", message)
}

pub fn protocol(py: Python<'_>, message: impl Into<String>) -> PyErr {
    err(py, "ProtocolError", message)
}
