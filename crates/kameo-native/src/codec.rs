//! serde_py: Python values to and from the kameo value encoding (see `kameo_proto::wire`).
//!
//! Both directions walk CPython objects through the C API for speed: exact built-in types are
//! recognised by their type pointer, subclasses of built-ins are encoded as their base.
//! Errors carry the path of the offending value inside the message (`message["a"][1]`).

use kameo_proto::wire::{self, put_varint, DecodeError, Reader, MAX_DEPTH};
use pyo3::exceptions::PyUnicodeEncodeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyType};
use std::ffi::c_char;
use std::fmt::Write as _;

/// One step of the path to a value inside a message.
enum Step {
    Index(usize),
    Key(String),
}

/// An encoding failure with the path to the offending value (innermost step last).
pub struct EncodeError {
    steps: Vec<Step>,
    message: String,
}

impl EncodeError {
    fn new(message: String) -> Self {
        EncodeError {
            steps: Vec::new(),
            message,
        }
    }

    fn at(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// `root["a"][1]: cannot encode object of type object`
    pub fn describe(&self, root: &str) -> String {
        let mut s = String::from(root);
        for step in self.steps.iter().rev() {
            match step {
                Step::Index(i) => {
                    let _ = write!(s, "[{i}]");
                }
                Step::Key(k) => {
                    let _ = write!(s, "[{k}]");
                }
            }
        }
        format!("{s}: {}", self.message)
    }
}

/// `repr()` of a dict key for error paths, shortened.
fn key_repr(key: *mut ffi::PyObject) -> String {
    // SAFETY: key is a live object borrowed from a dict we hold a reference to.
    let r = unsafe { ffi::PyObject_Repr(key) };
    if r.is_null() {
        unsafe { ffi::PyErr_Clear() };
        return "<key>".into();
    }
    let mut size: ffi::Py_ssize_t = 0;
    let p = unsafe { ffi::PyUnicode_AsUTF8AndSize(r, &mut size) };
    let out = if p.is_null() {
        unsafe { ffi::PyErr_Clear() };
        "<key>".to_string()
    } else {
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, size as usize) };
        let s = String::from_utf8_lossy(bytes);
        if s.chars().count() > 40 {
            format!("{}...", s.chars().take(40).collect::<String>())
        } else {
            s.into_owned()
        }
    };
    unsafe { ffi::Py_DECREF(r) };
    out
}

fn type_name(obj: *mut ffi::PyObject) -> String {
    // SAFETY: obj is live; the type object outlives it.
    let ty = unsafe { ffi::Py_TYPE(obj) };
    let py = unsafe { Python::assume_attached() };
    let ty = unsafe { Bound::from_borrowed_ptr(py, ty as *mut ffi::PyObject) };
    let Ok(ty) = ty.cast_into::<PyType>() else {
        return "<unknown type>".into();
    };
    match (ty.module(), ty.qualname()) {
        (Ok(m), Ok(q)) if m == "builtins" => q.to_string(),
        (Ok(m), Ok(q)) => format!("{m}.{q}"),
        _ => "<unknown type>".into(),
    }
}

/// Encode `obj` and append its bytes to `out`.
pub fn encode_into(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
    // SAFETY: the GIL is held (we have a Bound), and obj is a live object.
    unsafe { encode_ptr(out, obj.as_ptr(), 0) }
}

macro_rules! type_ptr {
    ($t:ident) => {
        &raw mut ffi::$t
    };
}

unsafe fn encode_ptr(
    out: &mut Vec<u8>,
    obj: *mut ffi::PyObject,
    depth: usize,
) -> Result<(), EncodeError> {
    let ty = ffi::Py_TYPE(obj);
    if obj == ffi::Py_None() {
        out.push(wire::TAG_NONE);
    } else if ty == type_ptr!(PyUnicode_Type) {
        encode_str(out, obj)?;
    } else if ty == type_ptr!(PyLong_Type) {
        encode_int(out, obj)?;
    } else if ty == type_ptr!(PyBool_Type) {
        out.push(if obj == ffi::Py_True() {
            wire::TAG_TRUE
        } else {
            wire::TAG_FALSE
        });
    } else if ty == type_ptr!(PyFloat_Type) {
        out.push(wire::TAG_FLOAT);
        out.extend_from_slice(&ffi::PyFloat_AS_DOUBLE(obj).to_le_bytes());
    } else if ty == type_ptr!(PyDict_Type) {
        encode_dict(out, obj, depth)?;
    } else if ty == type_ptr!(PyList_Type) {
        encode_list(out, obj, depth)?;
    } else if ty == type_ptr!(PyTuple_Type) {
        encode_tuple(out, obj, depth)?;
    } else if ty == type_ptr!(PyBytes_Type) {
        encode_bytes(out, obj);
    } else {
        // Subclasses of built-ins travel as their base type.
        if ffi::PyUnicode_Check(obj) != 0 {
            encode_str(out, obj)?;
        } else if ffi::PyLong_Check(obj) != 0 {
            encode_int(out, obj)?;
        } else if ffi::PyFloat_Check(obj) != 0 {
            out.push(wire::TAG_FLOAT);
            out.extend_from_slice(&ffi::PyFloat_AsDouble(obj).to_le_bytes());
        } else if ffi::PyDict_Check(obj) != 0 {
            encode_dict(out, obj, depth)?;
        } else if ffi::PyList_Check(obj) != 0 {
            encode_list(out, obj, depth)?;
        } else if ffi::PyTuple_Check(obj) != 0 {
            encode_tuple(out, obj, depth)?;
        } else if ffi::PyBytes_Check(obj) != 0 {
            encode_bytes(out, obj);
        } else {
            return Err(EncodeError::new(format!(
                "cannot encode object of type {}",
                type_name(obj)
            )));
        }
    }
    Ok(())
}

unsafe fn encode_str(out: &mut Vec<u8>, obj: *mut ffi::PyObject) -> Result<(), EncodeError> {
    let mut size: ffi::Py_ssize_t = 0;
    let p = ffi::PyUnicode_AsUTF8AndSize(obj, &mut size);
    if p.is_null() {
        let py = Python::assume_attached();
        let err = PyErr::fetch(py);
        let why = if err.is_instance_of::<PyUnicodeEncodeError>(py) {
            "str contains a lone surrogate and cannot be encoded as UTF-8".to_string()
        } else {
            format!("cannot encode str: {err}")
        };
        return Err(EncodeError::new(why));
    }
    out.push(wire::TAG_STR);
    put_varint(out, size as u64);
    out.extend_from_slice(std::slice::from_raw_parts(p as *const u8, size as usize));
    Ok(())
}

unsafe fn encode_bytes(out: &mut Vec<u8>, obj: *mut ffi::PyObject) {
    let size = ffi::PyBytes_Size(obj) as usize;
    let p = ffi::PyBytes_AS_STRING(obj) as *const u8;
    out.push(wire::TAG_BYTES);
    put_varint(out, size as u64);
    out.extend_from_slice(std::slice::from_raw_parts(p, size));
}

unsafe fn encode_int(out: &mut Vec<u8>, obj: *mut ffi::PyObject) -> Result<(), EncodeError> {
    let mut overflow: std::ffi::c_int = 0;
    let v = ffi::PyLong_AsLongLongAndOverflow(obj, &mut overflow);
    if overflow == 0 {
        if v == -1 && !ffi::PyErr_Occurred().is_null() {
            let err = PyErr::fetch(Python::assume_attached());
            return Err(EncodeError::new(format!("cannot encode int: {err}")));
        }
        out.push(wire::TAG_INT);
        out.extend_from_slice(&v.to_le_bytes());
        return Ok(());
    }
    // Beyond i64: little-endian two's complement through int.to_bytes (rare path).
    let py = Python::assume_attached();
    let int = Bound::from_borrowed_ptr(py, obj);
    let bytes = (|| -> PyResult<Vec<u8>> {
        let bits: usize = int.call_method0("bit_length")?.extract()?;
        let n = bits / 8 + 1;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("signed", true)?;
        int.call_method("to_bytes", (n, "little"), Some(&kwargs))?
            .extract()
    })()
    .map_err(|e| EncodeError::new(format!("cannot encode int: {e}")))?;
    out.push(wire::TAG_BIGINT);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(&bytes);
    Ok(())
}

fn too_deep() -> EncodeError {
    EncodeError::new(format!(
        "value nested deeper than {MAX_DEPTH} levels (or it contains a reference cycle)"
    ))
}

unsafe fn encode_list(
    out: &mut Vec<u8>,
    obj: *mut ffi::PyObject,
    depth: usize,
) -> Result<(), EncodeError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let n = ffi::PyList_GET_SIZE(obj) as usize;
    out.push(wire::TAG_LIST);
    put_varint(out, n as u64);
    for i in 0..n {
        // The list cannot change size: no Python code runs while we encode built-ins.
        let item = ffi::PyList_GET_ITEM(obj, i as ffi::Py_ssize_t);
        encode_ptr(out, item, depth + 1).map_err(|e| e.at(Step::Index(i)))?;
    }
    Ok(())
}

unsafe fn encode_tuple(
    out: &mut Vec<u8>,
    obj: *mut ffi::PyObject,
    depth: usize,
) -> Result<(), EncodeError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let n = ffi::PyTuple_GET_SIZE(obj) as usize;
    out.push(wire::TAG_TUPLE);
    put_varint(out, n as u64);
    for i in 0..n {
        let item = ffi::PyTuple_GET_ITEM(obj, i as ffi::Py_ssize_t);
        encode_ptr(out, item, depth + 1).map_err(|e| e.at(Step::Index(i)))?;
    }
    Ok(())
}

unsafe fn encode_dict(
    out: &mut Vec<u8>,
    obj: *mut ffi::PyObject,
    depth: usize,
) -> Result<(), EncodeError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let n = ffi::PyDict_Size(obj) as usize;
    out.push(wire::TAG_DICT);
    put_varint(out, n as u64);
    let mut pos: ffi::Py_ssize_t = 0;
    let mut key: *mut ffi::PyObject = std::ptr::null_mut();
    let mut value: *mut ffi::PyObject = std::ptr::null_mut();
    while ffi::PyDict_Next(obj, &mut pos, &mut key, &mut value) != 0 {
        encode_ptr(out, key, depth + 1).map_err(|e| e.at(Step::Key(key_repr(key))))?;
        encode_ptr(out, value, depth + 1).map_err(|e| e.at(Step::Key(key_repr(key))))?;
    }
    Ok(())
}

/// Decode one value spanning all of `buf`.
pub fn decode<'py>(py: Python<'py>, buf: &[u8]) -> Result<Bound<'py, PyAny>, DecodeError> {
    let mut r = Reader::new(buf);
    let mut keys = KeyCache::default();
    let v = decode_value(py, &mut r, 0, &mut keys)?;
    r.finish()?;
    Ok(v)
}

fn owned<'py>(
    py: Python<'py>,
    p: *mut ffi::PyObject,
    at: usize,
) -> Result<Bound<'py, PyAny>, DecodeError> {
    // SAFETY: p is a new reference returned by a C API constructor (or null on failure).
    match unsafe { Bound::from_owned_ptr_or_opt(py, p) } {
        Some(b) => Ok(b),
        None => {
            let _ = PyErr::take(py);
            Err(DecodeError::Invalid {
                at,
                why: "value rejected by Python",
            })
        }
    }
}

/// Short str dict keys already decoded in this message: a list of records repeats the same keys,
/// and reusing one str object per key saves the UTF-8 decode and the allocation (pickle gets
/// the same effect from its memo).
/// A short list searched linearly: records have a handful of keys, and a hash map would cost
/// more than it saves on small messages.
#[derive(Default)]
struct KeyCache<'b, 'py> {
    keys: Vec<(&'b [u8], Bound<'py, PyAny>)>,
}

const CACHED_KEY_MAX: usize = 32;
const CACHED_KEYS_MAX: usize = 32;

fn decode_key<'b, 'py>(
    py: Python<'py>,
    r: &mut Reader<'b>,
    keys: &mut KeyCache<'b, 'py>,
) -> Result<Bound<'py, PyAny>, DecodeError> {
    let at = r.pos();
    r.u8()?; // TAG_STR, checked by the caller
    let n = r.len(1)?;
    let b = r.take(n)?;
    if let Some((_, k)) = keys.keys.iter().find(|(kb, _)| *kb == b) {
        return Ok(k.clone());
    }
    // SAFETY: the GIL is held; b outlives the call.
    let p = unsafe {
        ffi::PyUnicode_DecodeUTF8(
            b.as_ptr() as *const c_char,
            n as ffi::Py_ssize_t,
            std::ptr::null(),
        )
    };
    if p.is_null() {
        let _ = PyErr::take(py);
        return Err(DecodeError::BadUtf8 { at });
    }
    let k = owned(py, p, at)?;
    if n <= CACHED_KEY_MAX && keys.keys.len() < CACHED_KEYS_MAX {
        keys.keys.push((b, k.clone()));
    }
    Ok(k)
}

fn decode_value<'b, 'py>(
    py: Python<'py>,
    r: &mut Reader<'b>,
    depth: usize,
    keys: &mut KeyCache<'b, 'py>,
) -> Result<Bound<'py, PyAny>, DecodeError> {
    let at = r.pos();
    let tag = r.u8()?;
    // SAFETY (all blocks below): the GIL is held; every pointer passed to the C API is either a
    // fresh reference we own or a buffer slice that outlives the call.
    unsafe {
        match tag {
            wire::TAG_NONE => Ok(py.None().into_bound(py)),
            wire::TAG_FALSE => owned(py, ffi::Py_NewRef(ffi::Py_False()), at),
            wire::TAG_TRUE => owned(py, ffi::Py_NewRef(ffi::Py_True()), at),
            wire::TAG_INT => {
                let v = r.i64()?;
                owned(py, ffi::PyLong_FromLongLong(v), at)
            }
            wire::TAG_BIGINT => {
                let n = r.len(1)?;
                let b = r.take(n)?;
                let bytes = PyBytes::new(py, b);
                let kwargs = PyDict::new(py);
                kwargs
                    .set_item("signed", true)
                    .map_err(|_| DecodeError::Invalid {
                        at,
                        why: "bad big int",
                    })?;
                py.get_type::<pyo3::types::PyInt>()
                    .call_method("from_bytes", (bytes, "little"), Some(&kwargs))
                    .map_err(|_| DecodeError::Invalid {
                        at,
                        why: "bad big int",
                    })
            }
            wire::TAG_FLOAT => {
                let v = r.f64()?;
                owned(py, ffi::PyFloat_FromDouble(v), at)
            }
            wire::TAG_STR => {
                let n = r.len(1)?;
                let b = r.take(n)?;
                let p = ffi::PyUnicode_DecodeUTF8(
                    b.as_ptr() as *const c_char,
                    n as ffi::Py_ssize_t,
                    std::ptr::null(),
                );
                if p.is_null() {
                    let _ = PyErr::take(py);
                    return Err(DecodeError::BadUtf8 { at });
                }
                owned(py, p, at)
            }
            wire::TAG_BYTES => {
                let n = r.len(1)?;
                let b = r.take(n)?;
                owned(
                    py,
                    ffi::PyBytes_FromStringAndSize(
                        b.as_ptr() as *const c_char,
                        n as ffi::Py_ssize_t,
                    ),
                    at,
                )
            }
            wire::TAG_LIST => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let n = r.len(1)?;
                let list = owned(py, ffi::PyList_New(n as ffi::Py_ssize_t), at)?;
                for i in 0..n {
                    let item = decode_value(py, r, depth + 1, keys)?;
                    ffi::PyList_SET_ITEM(list.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr());
                }
                Ok(list)
            }
            wire::TAG_TUPLE => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let n = r.len(1)?;
                let tuple = owned(py, ffi::PyTuple_New(n as ffi::Py_ssize_t), at)?;
                for i in 0..n {
                    let item = decode_value(py, r, depth + 1, keys)?;
                    ffi::PyTuple_SET_ITEM(tuple.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr());
                }
                Ok(tuple)
            }
            wire::TAG_DICT => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let n = r.len(2)?;
                let dict = PyDict::new(py);
                for _ in 0..n {
                    let k = if r.peek() == Some(wire::TAG_STR) {
                        decode_key(py, r, keys)?
                    } else {
                        decode_value(py, r, depth + 1, keys)?
                    };
                    let v = decode_value(py, r, depth + 1, keys)?;
                    if ffi::PyDict_SetItem(dict.as_ptr(), k.as_ptr(), v.as_ptr()) != 0 {
                        let _ = PyErr::take(py);
                        return Err(DecodeError::Invalid {
                            at,
                            why: "unhashable dict key",
                        });
                    }
                }
                Ok(dict.into_any())
            }
            tag => Err(DecodeError::UnknownTag { tag, at }),
        }
    }
}

/// Encode a whole value to a new buffer.
pub fn encode_to_vec(obj: &Bound<'_, PyAny>) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    encode_into(&mut out, obj)?;
    Ok(out)
}
