//! Raising the exceptions of `kameo.errors` (defined in Python, so that they can subclass the
//! right built-ins and carry rich attributes) from Rust.

use pyo3::prelude::*;

/// Build an instance of `kameo.errors.<name>(*args)`.
pub fn make<'py>(py: Python<'py>, name: &str, args: impl pyo3::call::PyCallArgs<'py>) -> PyErr {
    match py
        .import(pyo3::intern!(py, "kameo.errors"))
        .and_then(|m| m.getattr(name))
        .and_then(|cls| cls.call1(args))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
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
