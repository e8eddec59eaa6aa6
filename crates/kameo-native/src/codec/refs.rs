//! Python objects the rare value types need, looked up once per process.
//!
//! Modules the message could only contain values of if they were already imported (decimal,
//! uuid, numpy) are never imported by the encoder: it asks `sys.modules`. The decoder imports
//! what a value needs (numpy for an array, the module of an enum or dataclass).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyByteArray, PyBytes, PyComplex, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString,
    PyTuple, PyType,
};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Mutex;

type Cell = PyOnceLock<Py<PyAny>>;

fn import_attr<'py>(
    py: Python<'py>,
    cell: &'static Cell,
    module: &str,
    attr: &str,
) -> PyResult<Bound<'py, PyAny>> {
    cell.get_or_try_init(py, || py.import(module)?.getattr(attr).map(Bound::unbind))
        .map(|o| o.bind(py).clone())
}

/// The module if it has been imported by someone, without importing it.
pub fn loaded<'py>(py: Python<'py>, module: &str) -> Option<Bound<'py, PyAny>> {
    let modules = py.import("sys").ok()?.getattr("modules").ok()?;
    let modules = modules.cast_into::<PyDict>().ok()?;
    modules.get_item(module).ok().flatten()
}

macro_rules! class_ref {
    ($name:ident, $module:literal, $attr:literal) => {
        pub fn $name(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
            static CELL: Cell = PyOnceLock::new();
            import_attr(py, &CELL, $module, $attr)
        }
    };
}

class_ref!(enum_class, "enum", "Enum");
class_ref!(decimal_class, "decimal", "Decimal");
class_ref!(uuid_class, "uuid", "UUID");
class_ref!(zoneinfo_class, "zoneinfo", "ZoneInfo");
class_ref!(pickle_dumps, "pickle", "dumps");
class_ref!(pickle_loads, "pickle", "loads");
class_ref!(dataclass_fields, "dataclasses", "fields");
class_ref!(dtype_to_descr, "numpy.lib.format", "dtype_to_descr");
class_ref!(descr_to_dtype, "numpy.lib.format", "descr_to_dtype");
class_ref!(numpy_ascontiguous, "numpy", "ascontiguousarray");
class_ref!(numpy_asarray, "numpy", "asarray");

/// `numpy.ndarray` and `numpy.generic` when numpy is loaded.
pub fn numpy_types(py: Python<'_>) -> Option<(Bound<'_, PyAny>, Bound<'_, PyAny>)> {
    let np = loaded(py, "numpy")?;
    Some((np.getattr("ndarray").ok()?, np.getattr("generic").ok()?))
}

/// Whether an instance of an ndarray subclass is still exactly a plain array: `numpy.memmap`,
/// which only says where the memory lives (a received copy is an ordinary ndarray).
pub fn is_plain_array(py: Python<'_>, arr: &Bound<'_, PyAny>) -> bool {
    loaded(py, "numpy")
        .and_then(|np| np.getattr("memmap").ok())
        .is_some_and(|memmap| arr.get_type().is(&memmap))
}

/// Whether `obj` is a `numpy.ma.MaskedArray` (numpy.ma is loaded if one exists).
pub fn is_masked_array(py: Python<'_>, obj: &Bound<'_, PyAny>) -> bool {
    loaded(py, "numpy.ma")
        .and_then(|ma| ma.getattr("MaskedArray").ok())
        .is_some_and(|cls| obj.is_instance(&cls).unwrap_or(false))
}

/// The class at `module`.`qualname`, checked by `accept` (e.g. "is an Enum subclass").
///
/// Imports the module if needed: decoding an enum, dataclass or NamedTuple may import the
/// module that defines it (like pickle), but only ever looks up a class of the expected kind
/// in it and calls nothing else.
pub fn resolve_class<'py>(
    py: Python<'py>,
    module: &str,
    qualname: &str,
    accept: impl Fn(&Bound<'py, PyAny>) -> bool,
    what: &str,
) -> Result<Bound<'py, PyAny>, String> {
    if qualname.contains("<locals>") {
        return Err(format!(
            "{module}.{qualname} is defined inside a function and cannot be imported"
        ));
    }
    let mut obj = py
        .import(module)
        .map_err(|e| format!("cannot import module {module:?} for {module}.{qualname}: {e}"))?
        .into_any();
    for part in qualname.split('.') {
        obj = obj
            .getattr(PyString::new(py, part))
            .map_err(|_| format!("module {module:?} has no class {qualname}"))?;
    }
    if !accept(&obj) {
        return Err(format!("{module}.{qualname} is not {what}"));
    }
    Ok(obj)
}

/// `(module, qualname)` of a class, refusing classes that the other side could not import.
pub fn class_path(cls: &Bound<'_, PyAny>) -> Result<(String, String), String> {
    let module: String = cls
        .getattr("__module__")
        .and_then(|m| m.extract())
        .map_err(|_| "its class has no __module__".to_string())?;
    let qualname: String = cls
        .getattr("__qualname__")
        .and_then(|m| m.extract())
        .map_err(|_| "its class has no __qualname__".to_string())?;
    if qualname.contains("<locals>") {
        return Err(format!(
            "class {module}.{qualname} is defined inside a function, so the receiver cannot import it; define it at module level"
        ));
    }
    if module == "__main__" {
        return Err(format!(
            "class __main__.{qualname} is defined in the __main__ script, so the receiver cannot import it; move it to a module"
        ));
    }
    Ok((module, qualname))
}

/// Classes registered with `kameo.register_type`; `ANY_REGISTERED` spares the common case
/// (none) the lookup.
static REGISTERED: PyOnceLock<Py<PySet>> = PyOnceLock::new();
static ANY_REGISTERED: AtomicBool = AtomicBool::new(false);

fn registered_set(py: Python<'_>) -> PyResult<Bound<'_, PySet>> {
    REGISTERED
        .get_or_try_init(py, || PySet::empty(py).map(Bound::unbind))
        .map(|s| s.bind(py).clone())
}

/// Whether `cls` was registered with `kameo.register_type`.
pub fn is_registered(py: Python<'_>, cls: &Bound<'_, PyAny>) -> bool {
    ANY_REGISTERED.load(Ordering::Relaxed)
        && registered_set(py).is_ok_and(|s| s.contains(cls).unwrap_or(false))
}

/// The built-in type a registered subclass travels as: the first of these it derives from.
pub fn builtin_base<'py>(cls: &Bound<'py, PyType>) -> Option<Bound<'py, PyType>> {
    let py = cls.py();
    [
        py.get_type::<PyString>(),
        py.get_type::<PyInt>(),
        py.get_type::<PyFloat>(),
        py.get_type::<PyComplex>(),
        py.get_type::<PyBytes>(),
        py.get_type::<PyByteArray>(),
        py.get_type::<PyList>(),
        py.get_type::<PyTuple>(),
        py.get_type::<PyDict>(),
        py.get_type::<PyFrozenSet>(),
        py.get_type::<PySet>(),
    ]
    .into_iter()
    .find(|base| cls.is_subclass(base).unwrap_or(false))
}

/// Register a subclass of a built-in type so that its instances keep their class on the wire
/// (both sides must register it, normally at import of the module that defines it).
pub fn register(cls: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = cls.py();
    let ty = cls
        .cast::<PyType>()
        .map_err(|_| PyTypeError::new_err("register_type() takes a class"))?;
    let name = ty
        .fully_qualified_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "<class>".into());
    let module: String = ty.module().map(|m| m.to_string()).unwrap_or_default();
    let refuse = |why: &str| {
        Err(PyTypeError::new_err(format!(
            "cannot register {name}: {why}"
        )))
    };
    let Some(base) = builtin_base(ty) else {
        return refuse(
            "kameo.register_type takes subclasses of str, int, float, complex, bytes, bytearray, list, tuple, dict, set and frozenset",
        );
    };
    if module == "builtins" || ty.is(&base) {
        return refuse("it is a built-in type, which kameo sends as it is");
    }
    if ty.is_subclass(&enum_class(py)?)? {
        return refuse("enum members already keep their class");
    }
    if ty.hasattr("__dataclass_fields__")? {
        return refuse("dataclass instances already keep their class");
    }
    if ty.is_subclass_of::<PyTuple>()? && ty.hasattr("_fields")? {
        return refuse("NamedTuple instances already keep their class");
    }
    if let Some((_, generic)) = numpy_types(py) {
        if ty.is_subclass(&generic)? {
            return refuse("numpy scalars already keep their type");
        }
    }
    class_path(ty.as_any())
        .map_err(|why| PyValueError::new_err(format!("cannot register {name}: {why}")))?;
    registered_set(py)?.add(ty)?;
    ANY_REGISTERED.store(true, Ordering::Relaxed);
    Ok(())
}

/// The class whose exact instances are remote object references (kameo.Ref), null until
/// `set_ref_type`; the classes ever set are kept alive in `REF_TYPES`.
static REF_TYPE: AtomicPtr<pyo3::ffi::PyTypeObject> = AtomicPtr::new(std::ptr::null_mut());
static REF_TYPES: Mutex<Vec<Py<PyAny>>> = Mutex::new(Vec::new());

/// The remote reference class, or null.
#[inline]
pub fn ref_type() -> *mut pyo3::ffi::PyTypeObject {
    REF_TYPE.load(Ordering::Relaxed)
}

/// Make exact instances of `cls` travel as remote object references (`TAG_REMOTE`); None:
/// no class does any more.
pub fn set_ref_type(cls: &Bound<'_, PyAny>) -> PyResult<()> {
    if cls.is_none() {
        REF_TYPE.store(std::ptr::null_mut(), Ordering::Relaxed);
        return Ok(());
    }
    let ty = cls
        .cast::<PyType>()
        .map_err(|_| PyTypeError::new_err("set_ref_type() takes a class"))?;
    kameo_core::sys::lock(&REF_TYPES).push(ty.clone().into_any().unbind());
    REF_TYPE.store(ty.as_type_ptr(), Ordering::Relaxed);
    Ok(())
}
