//! The few Python calls the core makes on the objects it holds (futures, strings).

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;

type PyObject = Py<PyAny>;

pub fn pystr(py: Python<'_>, s: &str) -> PyObject {
    PyString::new(py, s).into_any().unbind()
}

/// `fut.done()`; true if it cannot say.
pub fn is_done(py: Python<'_>, fut: &Bound<'_, PyAny>) -> bool {
    fut.call_method0(intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

/// Resolve a stream's waiter (with None), unless it is done already.
#[inline]
pub fn wake(py: Python<'_>, waiter: Option<PyObject>) {
    if let Some(w) = waiter {
        let w = w.bind(py);
        if !is_done(py, w) {
            if let Err(e) = w.call_method1(intern!(py, "set_result"), (py.None(),)) {
                e.write_unraisable(py, Some(w));
            }
        }
    }
}
