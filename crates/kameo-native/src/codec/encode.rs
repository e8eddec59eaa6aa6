//! Python values to bytes.

use super::{refs, Arrays, Options, RefMode, Segments};
use crate::shm::ShmView;
use kameo_core::shm;
use kameo_proto::wire::{self, put_str, put_varint, Tz, MAX_DEPTH};
use pyo3::exceptions::PyUnicodeEncodeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple, PyType};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// One step of the path to a value inside a message.
enum Step {
    Index(usize),
    Key(String),
    Attr(String),
}

/// An encoding failure with the path to the offending value (innermost step last).
pub struct EncodeError {
    steps: Vec<Step>,
    /// The container of each step (to tell a reference cycle from deep nesting).
    parents: Vec<usize>,
    message: String,
    /// A remote reference refused for where it is (RefError rather than SerializationError).
    ref_error: bool,
    /// Refs of two workers in one call: (address of the first, its worker, the other worker),
    /// and once found, the first one's path (steps, parents).
    conflict: Option<Box<Conflict>>,
}

struct Conflict {
    first: usize,
    first_worker: u64,
    worker: u64,
    first_steps: Vec<Step>,
}

/// Longest path printed in full; deeper paths are elided in the middle.
const PATH_SHOWN: usize = 12;

impl EncodeError {
    fn new(message: String) -> Self {
        EncodeError {
            steps: Vec::new(),
            parents: Vec::new(),
            message,
            ref_error: false,
            conflict: None,
        }
    }

    fn refused_ref(message: String) -> Self {
        EncodeError {
            ref_error: true,
            ..Self::new(message)
        }
    }

    /// A remote reference refused where it was (kameo.errors.RefError).
    pub fn is_ref_error(&self) -> bool {
        self.ref_error
    }

    fn at(mut self, step: Step, parent: *mut ffi::PyObject) -> Self {
        self.steps.push(step);
        self.parents.push(parent as usize);
        self
    }

    fn path(root: &str, steps: &[&Step]) -> String {
        let mut s = String::from(root);
        let n = steps.len();
        for (i, step) in steps.iter().enumerate() {
            if n > PATH_SHOWN && i == PATH_SHOWN / 2 {
                let _ = write!(s, "...({} levels)...", n - PATH_SHOWN);
            }
            if n > PATH_SHOWN && i >= PATH_SHOWN / 2 && i < n - PATH_SHOWN / 2 {
                continue;
            }
            let _ = match step {
                Step::Index(i) => write!(s, "[{i}]"),
                Step::Key(k) => write!(s, "[{k}]"),
                Step::Attr(a) => write!(s, ".{a}"),
            };
        }
        s
    }

    /// `root["a"][1]: cannot encode object of type object`
    pub fn describe(&self, root: &str) -> String {
        let steps: Vec<&Step> = self.steps.iter().rev().collect();
        let parents: Vec<usize> = self.parents.iter().rev().copied().collect();
        // A container met again below itself: a reference cycle, reported where it closes.
        for (j, p) in parents.iter().enumerate() {
            if let Some(i) = parents[..j].iter().position(|q| q == p) {
                return format!(
                    "{}: contains a reference cycle (it is the same object as {}); kameo sends values that share lists or dicts, but not cycles",
                    Self::path(root, &steps[..j]),
                    Self::path(root, &steps[..i]),
                );
            }
        }
        let here = Self::path(root, &steps);
        if let Some(c) = &self.conflict {
            let first: Vec<&Step> = c.first_steps.iter().rev().collect();
            return format!(
                "{here}: refs of two workers in one call: {} is a ref of worker {}, {here} of worker {}; a call runs on the one worker that holds its refs",
                Self::path(root, &first),
                c.first_worker,
                c.worker,
            );
        }
        format!("{here}: {}", self.message)
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

pub(super) fn type_name(obj: *mut ffi::PyObject) -> String {
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

macro_rules! type_ptr {
    ($t:ident) => {
        &raw mut ffi::$t
    };
}

fn too_deep() -> EncodeError {
    EncodeError::new(format!("value nested deeper than {MAX_DEPTH} levels"))
}

fn py_err(what: &str, e: PyErr) -> EncodeError {
    EncodeError::new(format!("{what}: {e}"))
}

/// Writes one value; see the module documentation.
pub struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    opts: &'a Options,
    segs: &'a mut Segments,
    shared: Option<Box<Shared>>,
    /// The first remote reference met with [`RefMode::Parent`]: (its worker, its address).
    first_ref: Option<(u64, usize)>,
}

/// The lists and dicts a message holds more than once. The first occurrence is written as
/// TAG_SHARED and the value, the others as TAG_REF and its index, so the receiver gets one
/// object wherever the sender had one (as pickle does), and the data travels once.
///
/// Only a container with a reference besides the one it is reached through can occur twice,
/// so no other is looked up: records of their own cost nothing.
#[derive(Default)]
struct Shared {
    /// Address → index, None while the value is being written (met again then, it is a
    /// cycle).
    seen: HashMap<usize, Option<u64>, BuildHasherDefault<AddrHasher>>,
    /// A reference to each, so that no address is reused while the message is encoded.
    held: Vec<*mut ffi::PyObject>,
    next: u64,
    /// The last one written or referred to (address 0: none), and its index.
    last: (usize, u64),
}

/// Hashes an object address: one multiply (the default SipHash costs more than the rest of
/// a lookup, and addresses are not chosen by an attacker).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        // Objects are 16-byte aligned: drop the bits that never vary.
        self.0 = ((n as u64) >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for &obj in &self.held {
            // SAFETY: references we took; encoders run with the GIL held.
            unsafe { ffi::Py_DECREF(obj) };
        }
    }
}

impl<'a> Encoder<'a> {
    pub fn new(out: &'a mut Vec<u8>, opts: &'a Options, segs: &'a mut Segments) -> Self {
        Encoder {
            out,
            opts,
            segs,
            shared: None,
            first_ref: None,
        }
    }

    /// Encode `obj` and append its bytes.
    pub fn encode(&mut self, obj: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
        // SAFETY: the GIL is held (we have a Bound), and obj is a live object.
        let r = unsafe { self.value(obj.as_ptr(), 0) };
        r.map_err(|e| self.locate_conflict(e, |enc| enc.encode(obj)))
    }

    /// The worker of the remote references the value held (with [`RefMode::Parent`]).
    pub fn ref_worker(&self) -> Option<u64> {
        self.first_ref.map(|(w, _)| w)
    }

    /// For refs of two workers: encode the value again, failing at the first ref, for its path.
    #[cold]
    fn locate_conflict(
        &self,
        mut e: EncodeError,
        again: impl FnOnce(&mut Encoder<'_>) -> Result<(), EncodeError>,
    ) -> EncodeError {
        if let Some(c) = e.conflict.as_mut() {
            let opts = Options {
                refs: RefMode::Locate(c.first),
                shm_threshold: usize::MAX,
                ..self.opts.clone()
            };
            let (mut out, mut segs) = (Vec::new(), Segments::new());
            if let Err(found) = again(&mut Encoder::new(&mut out, &opts, &mut segs)) {
                c.first_steps = found.steps;
            }
        }
        e
    }

    /// Encode the tuple `obj` as a record of values of their own: a frame body the caller
    /// assembles around a message, like a callback's `(path, data, request_id)`. An item is
    /// not looked up as shared (other holders, such as the caller's variables, do not make it
    /// so): as for a top-level value, only a cycle could meet it again in this message.
    pub fn encode_record(&mut self, obj: &Bound<'_, PyTuple>) -> Result<(), EncodeError> {
        let r = self.record(obj);
        r.map_err(|e| self.locate_conflict(e, |enc| enc.record(obj)))
    }

    fn record(&mut self, obj: &Bound<'_, PyTuple>) -> Result<(), EncodeError> {
        let obj = obj.as_ptr();
        // SAFETY: the GIL is held (we have a Bound); the tuple holds its items while it lives.
        unsafe {
            let n = ffi::PyTuple_GET_SIZE(obj) as usize;
            self.out.push(wire::TAG_TUPLE);
            put_varint(self.out, n as u64);
            for i in 0..n {
                let item = ffi::PyTuple_GET_ITEM(obj, i as ffi::Py_ssize_t);
                let ty = ffi::Py_TYPE(item);
                let r = if ty == type_ptr!(PyDict_Type) || ty == type_ptr!(PyList_Type) {
                    self.container(item, 1)
                } else {
                    self.value(item, 1)
                };
                r.map_err(|e| e.at(Step::Index(i), obj))?;
            }
        }
        Ok(())
    }

    unsafe fn value(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<(), EncodeError> {
        let ty = ffi::Py_TYPE(obj);
        if obj == ffi::Py_None() {
            self.out.push(wire::TAG_NONE);
        } else if ty == type_ptr!(PyUnicode_Type) {
            self.str(obj)?;
        } else if ty == type_ptr!(PyLong_Type) {
            self.int(obj)?;
        } else if ty == type_ptr!(PyBool_Type) {
            self.out.push(if obj == ffi::Py_True() {
                wire::TAG_TRUE
            } else {
                wire::TAG_FALSE
            });
        } else if ty == type_ptr!(PyFloat_Type) {
            put_fixed(
                self.out,
                wire::TAG_FLOAT,
                ffi::PyFloat_AS_DOUBLE(obj).to_le_bytes(),
            );
        } else if ty == type_ptr!(PyDict_Type) || ty == type_ptr!(PyList_Type) {
            // Below the top, every container is reached with a reference of our own (see
            // `held`): more than two means another holder, perhaps in this very message.
            if depth > 0 && ffi::Py_REFCNT(obj) > 2 {
                self.shared(obj, depth)?;
            } else {
                self.container(obj, depth)?;
            }
        } else if ty == type_ptr!(PyTuple_Type) {
            self.tuple(obj, wire::TAG_TUPLE, depth)?;
        } else if ty == type_ptr!(PyBytes_Type) {
            self.bytes_like(wire::TAG_BYTES, bytes_data(obj), true)?;
        } else {
            self.other(obj, depth)?;
        }
        Ok(())
    }

    /// An exact list or dict.
    #[inline(always)]
    unsafe fn container(
        &mut self,
        obj: *mut ffi::PyObject,
        depth: usize,
    ) -> Result<(), EncodeError> {
        if ffi::Py_TYPE(obj) == type_ptr!(PyDict_Type) {
            self.dict(obj, depth)
        } else {
            self.list(obj, depth)
        }
    }

    /// A list or dict that something else holds too: a reference if this message wrote it
    /// already, else TAG_SHARED and the value.
    #[inline(never)]
    unsafe fn shared(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<(), EncodeError> {
        let key = obj as usize;
        let sh = self.shared.get_or_insert_with(Box::default);
        // Records that share one list meet it over and over: check the last one first.
        if sh.last.0 == key {
            self.out.push(wire::TAG_REF);
            put_varint(self.out, sh.last.1);
            return Ok(());
        }
        match sh.seen.get(&key) {
            Some(&Some(i)) => {
                sh.last = (key, i);
                self.out.push(wire::TAG_REF);
                put_varint(self.out, i);
                return Ok(());
            }
            // Met inside itself: a cycle. Written again, it ends at the depth limit, which
            // reports the cycle and where it closes.
            Some(None) => return self.container(obj, depth),
            None => {}
        }
        ffi::Py_INCREF(obj);
        sh.held.push(obj);
        sh.seen.insert(key, None);
        self.out.push(wire::TAG_SHARED);
        self.container(obj, depth)?;
        let sh = self.shared.as_mut().expect("set above");
        sh.seen.insert(key, Some(sh.next));
        sh.last = (key, sh.next);
        sh.next += 1;
        Ok(())
    }

    /// `value` for an object borrowed from a container: scalars are written at once (no
    /// Python code runs), anything else holds a reference while it is encoded, since Python
    /// code run on the way (a property, numpy) could drop it from the container.
    #[inline(always)]
    unsafe fn held(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<(), EncodeError> {
        let ty = ffi::Py_TYPE(obj);
        if ty == type_ptr!(PyUnicode_Type) {
            self.str(obj)
        } else if ty == type_ptr!(PyLong_Type) {
            self.int(obj)
        } else if ty == type_ptr!(PyFloat_Type) {
            put_fixed(
                self.out,
                wire::TAG_FLOAT,
                ffi::PyFloat_AS_DOUBLE(obj).to_le_bytes(),
            );
            Ok(())
        } else {
            ffi::Py_INCREF(obj);
            let r = self.value(obj, depth);
            ffi::Py_DECREF(obj);
            r
        }
    }

    #[inline(always)]
    unsafe fn str(&mut self, obj: *mut ffi::PyObject) -> Result<(), EncodeError> {
        if ffi::PyUnicode_IS_COMPACT_ASCII(obj) != 0 {
            let n = ffi::PyUnicode_GET_LENGTH(obj) as usize;
            put_tagged(self.out, wire::TAG_STR, ffi::PyUnicode_1BYTE_DATA(obj), n);
            return Ok(());
        }
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
        put_tagged(self.out, wire::TAG_STR, p as *const u8, size as usize);
        Ok(())
    }

    unsafe fn int(&mut self, obj: *mut ffi::PyObject) -> Result<(), EncodeError> {
        let mut overflow: std::ffi::c_int = 0;
        let v = ffi::PyLong_AsLongLongAndOverflow(obj, &mut overflow);
        if overflow == 0 {
            if v == -1 && !ffi::PyErr_Occurred().is_null() {
                let err = PyErr::fetch(Python::assume_attached());
                return Err(EncodeError::new(format!("cannot encode int: {err}")));
            }
            put_fixed(self.out, wire::TAG_INT, v.to_le_bytes());
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
        .map_err(|e| py_err("cannot encode int", e))?;
        self.out.push(wire::TAG_BIGINT);
        put_varint(self.out, bytes.len() as u64);
        self.out.extend_from_slice(&bytes);
        Ok(())
    }

    /// bytes, bytearray (TAG_BYTES / TAG_BYTEARRAY) inline, or in shared memory when large.
    /// `immutable`: no other thread can change the bytes, so the copy runs without the GIL.
    unsafe fn bytes_like(
        &mut self,
        tag: u8,
        data: &[u8],
        immutable: bool,
    ) -> Result<(), EncodeError> {
        if data.len() >= self.opts.shm_threshold {
            let py = Python::assume_attached();
            // The receiver copies bytes and bytearrays out: a recycled segment will do.
            let copy = |data: &[u8]| match &self.opts.recycler {
                Some(r) => r.send_copy(data),
                None => shm::create_sealed(data),
            };
            let fd = if immutable {
                // The slice is only read, and the object it belongs to is kept alive by the
                // caller for the whole call.
                let addr = data.as_ptr() as usize;
                let len = data.len();
                py.detach(|| copy(std::slice::from_raw_parts(addr as *const u8, len)))
            } else {
                copy(data)
            }
            .map_err(|e| EncodeError::new(format!("cannot create shared memory: {e}")))?;
            let idx = self.add_segment(Arc::new(fd))?;
            self.out.push(wire::TAG_SHM_BYTES);
            self.out.push(u8::from(tag == wire::TAG_BYTEARRAY));
            wire::ShmRef {
                fd: idx,
                offset: 0,
                len: data.len() as u64,
            }
            .write(self.out);
            return Ok(());
        }
        self.out.push(tag);
        put_varint(self.out, data.len() as u64);
        self.out.extend_from_slice(data);
        Ok(())
    }

    fn add_segment(&mut self, fd: Arc<std::os::fd::OwnedFd>) -> Result<u64, EncodeError> {
        if let Some(i) = self.segs.iter().position(|s| Arc::ptr_eq(s, &fd)) {
            return Ok(i as u64);
        }
        if self.segs.len() >= kameo_proto::frame::MAX_FDS {
            return Err(EncodeError::new(format!(
                "more than {} large buffers in one message; send them in several messages or raise shm_threshold",
                kameo_proto::frame::MAX_FDS
            )));
        }
        self.segs.push(fd);
        Ok(self.segs.len() as u64 - 1)
    }

    unsafe fn list(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<(), EncodeError> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let n = ffi::PyList_GET_SIZE(obj);
        self.out.push(wire::TAG_LIST);
        put_varint(self.out, n as u64);
        let mut i = 0;
        while i < n {
            // Encoding an item may run Python code (a property, numpy) that changes the list:
            // hold the item, and re-check the size.
            if i >= ffi::PyList_GET_SIZE(obj) {
                break;
            }
            #[cfg(not(Py_GIL_DISABLED))]
            let r = self.held(ffi::PyList_GET_ITEM(obj, i), depth + 1);
            // Free-threaded: another thread may replace the item (and free it) at any time, so
            // take a reference of our own with the read.
            #[cfg(Py_GIL_DISABLED)]
            let r = {
                let item = ffi::PyList_GetItemRef(obj, i);
                if item.is_null() {
                    ffi::PyErr_Clear(); // shrunk by another thread: reported below
                    break;
                }
                let r = self.value(item, depth + 1);
                ffi::Py_DECREF(item);
                r
            };
            r.map_err(|e| e.at(Step::Index(i as usize), obj))?;
            i += 1;
        }
        if ffi::PyList_GET_SIZE(obj) != n {
            return Err(EncodeError::new(
                "list changed size while being encoded".into(),
            ));
        }
        Ok(())
    }

    unsafe fn tuple(
        &mut self,
        obj: *mut ffi::PyObject,
        tag: u8,
        depth: usize,
    ) -> Result<(), EncodeError> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let n = ffi::PyTuple_GET_SIZE(obj) as usize;
        self.out.push(tag);
        put_varint(self.out, n as u64);
        for i in 0..n {
            let item = ffi::PyTuple_GET_ITEM(obj, i as ffi::Py_ssize_t);
            self.held(item, depth + 1)
                .map_err(|e| e.at(Step::Index(i), obj))?;
        }
        Ok(())
    }

    unsafe fn dict(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<(), EncodeError> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        #[cfg(not(Py_GIL_DISABLED))]
        return self.dict_items(obj, depth);
        // Free-threaded: `PyDict_Next` is only safe while the dict is locked, and its borrowed
        // key and value only while nothing else can change the dict (the lock is let go while
        // a nested value waits for another lock), so every pair is held with references.
        #[cfg(Py_GIL_DISABLED)]
        {
            let py = Python::assume_attached();
            let dict = Bound::from_borrowed_ptr(py, obj);
            pyo3::sync::critical_section::with_critical_section(&dict, || {
                self.dict_items(obj, depth)
            })
        }
    }

    unsafe fn dict_items(
        &mut self,
        obj: *mut ffi::PyObject,
        depth: usize,
    ) -> Result<(), EncodeError> {
        let n = ffi::PyDict_Size(obj);
        self.out.push(wire::TAG_DICT);
        put_varint(self.out, n as u64);
        let mut pos: ffi::Py_ssize_t = 0;
        let mut key: *mut ffi::PyObject = std::ptr::null_mut();
        let mut value: *mut ffi::PyObject = std::ptr::null_mut();
        let mut seen = 0;
        while ffi::PyDict_Next(obj, &mut pos, &mut key, &mut value) != 0 {
            // key and value are borrowed: they need references of their own only while
            // something that may run Python code (which could change the dict) is encoded.
            if cfg!(not(Py_GIL_DISABLED))
                && ffi::Py_TYPE(key) == type_ptr!(PyUnicode_Type)
                && is_scalar(ffi::Py_TYPE(value))
            {
                let r = self.str(key).and_then(|()| self.held(value, depth + 1));
                r.map_err(|e| e.at(Step::Key(key_repr(key)), obj))?;
            } else {
                ffi::Py_INCREF(key);
                ffi::Py_INCREF(value);
                let r = self
                    .value(key, depth + 1)
                    .and_then(|()| self.value(value, depth + 1));
                let r = r.map_err(|e| e.at(Step::Key(key_repr(key)), obj));
                ffi::Py_DECREF(key);
                ffi::Py_DECREF(value);
                r?;
            }
            seen += 1;
        }
        if seen != n || ffi::PyDict_Size(obj) != n {
            return Err(EncodeError::new(
                "dict changed size while being encoded".into(),
            ));
        }
        Ok(())
    }

    unsafe fn set(
        &mut self,
        obj: *mut ffi::PyObject,
        tag: u8,
        depth: usize,
    ) -> Result<(), EncodeError> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let py = Python::assume_attached();
        // A snapshot: encoding members may run Python code.
        let items = Bound::from_owned_ptr_or_err(py, ffi::PySequence_List(obj))
            .map_err(|e| py_err("cannot iterate set", e))?;
        let n = ffi::PyList_GET_SIZE(items.as_ptr());
        self.out.push(tag);
        put_varint(self.out, n as u64);
        for i in 0..n {
            let item = ffi::PyList_GET_ITEM(items.as_ptr(), i);
            self.value(item, depth + 1)
                .map_err(|e| e.at(Step::Key(format!("member {}", key_repr(item))), obj))?;
        }
        Ok(())
    }

    /// Everything that is not an exact None/bool/int/float/str/bytes/list/tuple/dict.
    #[inline(never)]
    unsafe fn other(&mut self, obj: *mut ffi::PyObject, depth: usize) -> Result<(), EncodeError> {
        let py = Python::assume_attached();
        let any = Bound::from_borrowed_ptr(py, obj);
        if ffi::Py_TYPE(obj) == refs::ref_type() {
            return self.remote(&any);
        }
        if refs::is_registered(py, any.get_type().as_any()) {
            return self.registered(&any, depth);
        }
        if ffi::PyDateTimeAPI().is_null() {
            ffi::PyDateTime_IMPORT();
            if ffi::PyDateTimeAPI().is_null() {
                return Err(py_err("cannot load datetime", PyErr::fetch(py)));
            }
        }
        if ffi::PyDateTime_Check(obj) != 0 {
            return self.datetime(&any);
        }
        if ffi::PyDate_Check(obj) != 0 {
            self.out.push(wire::TAG_DATE);
            self.out
                .extend_from_slice(&(ffi::PyDateTime_GET_YEAR(obj) as u16).to_le_bytes());
            self.out.push(ffi::PyDateTime_GET_MONTH(obj) as u8);
            self.out.push(ffi::PyDateTime_GET_DAY(obj) as u8);
            return Ok(());
        }
        if ffi::PyTime_Check(obj) != 0 {
            return self.time(&any);
        }
        if ffi::PyDelta_Check(obj) != 0 {
            self.out.push(wire::TAG_TIMEDELTA);
            for v in [
                ffi::PyDateTime_DELTA_GET_DAYS(obj),
                ffi::PyDateTime_DELTA_GET_SECONDS(obj),
                ffi::PyDateTime_DELTA_GET_MICROSECONDS(obj),
            ] {
                self.out.extend_from_slice(&v.to_le_bytes());
            }
            return Ok(());
        }
        let enum_cls = refs::enum_class(py).map_err(|e| py_err("cannot load enum", e))?;
        if any.is_instance(&enum_cls).unwrap_or(false) {
            return self.enum_member(&any, depth);
        }
        if ffi::PyTuple_Check(obj) != 0 && any.get_type().hasattr("_fields").unwrap_or(false) {
            return self.named_tuple(&any, depth);
        }
        if ffi::PyComplex_Check(obj) != 0 {
            self.complex(obj);
            return Ok(());
        }
        if ffi::PyFrozenSet_Check(obj) != 0 {
            return self.set(obj, wire::TAG_FROZENSET, depth);
        }
        if ffi::PySet_Check(obj) != 0 {
            return self.set(obj, wire::TAG_SET, depth);
        }
        if ffi::PyByteArray_Check(obj) != 0 {
            return self.bytearray(obj);
        }
        if ffi::PyMemoryView_Check(obj) != 0 {
            // Arrives as bytes; a non-contiguous view is gathered first.
            let b = any
                .call_method0("tobytes")
                .map_err(|e| py_err("cannot read memoryview", e))?;
            return self.bytes_like(wire::TAG_BYTES, bytes_data(b.as_ptr()), true);
        }
        if let Some(dec) = refs::loaded(py, "decimal") {
            if let Ok(cls) = dec.getattr("Decimal") {
                if any.is_instance(&cls).unwrap_or(false) {
                    let s: String = any
                        .str()
                        .and_then(|s| s.extract())
                        .map_err(|e| py_err("cannot encode Decimal", e))?;
                    self.out.push(wire::TAG_DECIMAL);
                    put_str(self.out, &s);
                    return Ok(());
                }
            }
        }
        if let Some(uuid) = refs::loaded(py, "uuid") {
            if let Ok(cls) = uuid.getattr("UUID") {
                if any.is_instance(&cls).unwrap_or(false) {
                    let b: Vec<u8> = any
                        .getattr("bytes")
                        .and_then(|b| b.extract())
                        .map_err(|e| py_err("cannot encode UUID", e))?;
                    if b.len() != 16 {
                        return Err(EncodeError::new("UUID.bytes is not 16 bytes".into()));
                    }
                    self.out.push(wire::TAG_UUID);
                    self.out.extend_from_slice(&b);
                    return Ok(());
                }
            }
        }
        if !any.is_instance_of::<PyType>()
            && any
                .get_type()
                .hasattr("__dataclass_fields__")
                .unwrap_or(false)
        {
            return self.dataclass(&any, depth);
        }
        if let Some((ndarray, generic)) = refs::numpy_types(py) {
            if any.is_instance(&ndarray).unwrap_or(false) {
                if !any.get_type().is(&ndarray) && !refs::is_plain_array(py, &any) {
                    return self.array_subclass(&any);
                }
                return self.ndarray(&any, wire::TAG_NDARRAY, depth);
            }
            if any.is_instance(&generic).unwrap_or(false) {
                let arr = refs::numpy_asarray(py)
                    .and_then(|f| f.call1((&any,)))
                    .map_err(|e| py_err("cannot encode numpy scalar", e))?;
                return self.ndarray(&arr, wire::TAG_NPSCALAR, depth);
            }
        }
        // Subclasses of built-ins travel as their base type.
        if ffi::PyUnicode_Check(obj) != 0 {
            return self.str(obj);
        } else if ffi::PyLong_Check(obj) != 0 {
            return self.int(obj);
        } else if ffi::PyFloat_Check(obj) != 0 {
            self.out.push(wire::TAG_FLOAT);
            self.out
                .extend_from_slice(&ffi::PyFloat_AsDouble(obj).to_le_bytes());
            return Ok(());
        } else if ffi::PyDict_Check(obj) != 0 {
            return self.dict(obj, depth);
        } else if ffi::PyList_Check(obj) != 0 {
            return self.list(obj, depth);
        } else if ffi::PyTuple_Check(obj) != 0 {
            return self.tuple(obj, wire::TAG_TUPLE, depth);
        } else if ffi::PyBytes_Check(obj) != 0 {
            return self.bytes_like(wire::TAG_BYTES, bytes_data(obj), true);
        }
        self.pickled(&any)
    }

    /// A remote object reference (an exact instance of the `set_ref_type` class): TAG_REMOTE,
    /// where `opts.refs` allows it.
    fn remote(&mut self, any: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
        let addr = any.as_ptr() as usize;
        match self.opts.refs {
            RefMode::Refuse => return Err(EncodeError::new(
                "a kameo.Ref can only be sent to the workers of its pool (in a call's arguments)"
                    .into(),
            )),
            RefMode::Locate(at) if at == addr => {
                return Err(EncodeError::new("(located)".into()));
            }
            _ => {}
        }
        let attr = |name: &str| {
            any.getattr(name)
                .map_err(|e| py_err(&format!("cannot read kameo.Ref.{name}"), e))
        };
        let int = |name: &str| {
            attr(name)?
                .extract::<u64>()
                .map_err(|e| py_err(&format!("kameo.Ref.{name} is not a non-negative int"), e))
        };
        let wid = int("_wid")?;
        if wid > u64::from(u32::MAX) {
            return Err(EncodeError::new(format!(
                "kameo.Ref._wid {wid} is not a worker id"
            )));
        }
        let num = int("_num")?;
        let type_name: String = attr("_type")?
            .extract()
            .map_err(|e| py_err("kameo.Ref._type is not a str", e))?;
        if let RefMode::Parent { key } = self.opts.refs {
            if int("_key")? != key {
                return Err(EncodeError::refused_ref(format!(
                    "ref {wid}:{num} ({type_name}) belongs to another pool"
                )));
            }
            match self.first_ref {
                None => self.first_ref = Some((wid, addr)),
                Some((first_worker, first)) if first_worker != wid => {
                    let mut e = EncodeError::refused_ref(String::new());
                    e.conflict = Some(Box::new(Conflict {
                        first,
                        first_worker,
                        worker: wid,
                        first_steps: Vec::new(),
                    }));
                    return Err(e);
                }
                Some(_) => {}
            }
        }
        self.out.push(wire::TAG_REMOTE);
        put_varint(self.out, wid);
        put_varint(self.out, num);
        put_str(self.out, &type_name);
        Ok(())
    }

    unsafe fn bytearray(&mut self, obj: *mut ffi::PyObject) -> Result<(), EncodeError> {
        // Free-threaded: another thread may resize the bytearray (and free its buffer) while it
        // is copied; an exported buffer cannot be resized.
        #[cfg(Py_GIL_DISABLED)]
        {
            let mut view: ffi::Py_buffer = std::mem::zeroed();
            if ffi::PyObject_GetBuffer(obj, &mut view, ffi::PyBUF_SIMPLE) != 0 {
                let py = Python::assume_attached();
                return Err(py_err("cannot read bytearray", PyErr::fetch(py)));
            }
            let data = if view.len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(view.buf as *const u8, view.len as usize)
            };
            let r = self.bytes_like(wire::TAG_BYTEARRAY, data, false);
            ffi::PyBuffer_Release(&mut view);
            return r;
        }
        #[allow(unreachable_code)]
        let n = ffi::PyByteArray_Size(obj) as usize;
        let p = ffi::PyByteArray_AsString(obj) as *const u8;
        let data = if n == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(p, n)
        };
        self.bytes_like(wire::TAG_BYTEARRAY, data, false)
    }

    unsafe fn complex(&mut self, obj: *mut ffi::PyObject) {
        self.out.push(wire::TAG_COMPLEX);
        self.out
            .extend_from_slice(&ffi::PyComplex_RealAsDouble(obj).to_le_bytes());
        self.out
            .extend_from_slice(&ffi::PyComplex_ImagAsDouble(obj).to_le_bytes());
    }

    /// An instance of a class registered with `kameo.register_type`: the class, then the
    /// value as its built-in base.
    unsafe fn registered(
        &mut self,
        any: &Bound<'_, PyAny>,
        depth: usize,
    ) -> Result<(), EncodeError> {
        self.class_of(wire::TAG_SUBCLASS, any, "registered type", depth)?;
        let obj = any.as_ptr();
        let depth = depth + 1;
        if ffi::PyUnicode_Check(obj) != 0 {
            self.str(obj)
        } else if ffi::PyLong_Check(obj) != 0 {
            self.int(obj)
        } else if ffi::PyFloat_Check(obj) != 0 {
            put_fixed(
                self.out,
                wire::TAG_FLOAT,
                ffi::PyFloat_AsDouble(obj).to_le_bytes(),
            );
            Ok(())
        } else if ffi::PyComplex_Check(obj) != 0 {
            self.complex(obj);
            Ok(())
        } else if ffi::PyBytes_Check(obj) != 0 {
            self.bytes_like(wire::TAG_BYTES, bytes_data(obj), true)
        } else if ffi::PyByteArray_Check(obj) != 0 {
            self.bytearray(obj)
        } else if ffi::PyList_Check(obj) != 0 {
            self.list(obj, depth)
        } else if ffi::PyTuple_Check(obj) != 0 {
            self.tuple(obj, wire::TAG_TUPLE, depth)
        } else if ffi::PyDict_Check(obj) != 0 {
            self.dict(obj, depth)
        } else if ffi::PyFrozenSet_Check(obj) != 0 {
            self.set(obj, wire::TAG_FROZENSET, depth)
        } else if ffi::PySet_Check(obj) != 0 {
            self.set(obj, wire::TAG_SET, depth)
        } else {
            // register_type only takes subclasses of the types above.
            Err(EncodeError::new(format!(
                "registered type {} is not a subclass of a built-in type",
                type_name(obj)
            )))
        }
    }

    /// An ndarray subclass that would not arrive as itself: a plain array carries dtype, shape
    /// and data, not a mask, matrix semantics, record fields or a subclass's own attributes.
    /// Pickled when allowed (exact); otherwise refused, saying what to send instead.
    fn array_subclass(&mut self, any: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
        if self.opts.allow_pickle {
            return self.pickled(any);
        }
        let todo = if refs::is_masked_array(any.py(), any) {
            "its mask would be lost; send value.data and value.mask (numpy.ma.getmaskarray(value) gives it in full) as two arrays, or value.filled(fill_value)"
        } else {
            "it would arrive as a plain numpy.ndarray, without what the subclass adds; send numpy.asarray(value) for the plain array"
        };
        Err(EncodeError::new(format!(
            "cannot encode {} (a numpy.ndarray subclass): {todo}, or pass allow_pickle=True to pickle it",
            type_name(any.as_ptr())
        )))
    }

    /// The last resort: pickle, when allowed.
    fn pickled(&mut self, any: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
        if !self.opts.allow_pickle {
            return Err(EncodeError::new(format!(
                "cannot encode object of type {} (kameo sends built-in values, datetime, Decimal, UUID, enums, dataclasses, NamedTuples and numpy arrays; pass allow_pickle=True to pickle anything else)",
                type_name(any.as_ptr())
            )));
        }
        let py = any.py();
        let data = refs::pickle_dumps(py)
            .and_then(|f| f.call1((any, 5)))
            .map_err(|e| {
                EncodeError::new(format!(
                    "cannot pickle object of type {}: {e}",
                    type_name(any.as_ptr())
                ))
            })?;
        let data = data
            .cast_into::<PyBytes>()
            .map_err(|_| EncodeError::new("pickle.dumps did not return bytes".into()))?;
        self.out.push(wire::TAG_PICKLE);
        put_varint(self.out, data.as_bytes().len() as u64);
        self.out.extend_from_slice(data.as_bytes());
        Ok(())
    }

    unsafe fn datetime(&mut self, any: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
        let obj = any.as_ptr();
        let mut fixed = Vec::with_capacity(wire::DATETIME_FIXED);
        fixed.extend_from_slice(&(ffi::PyDateTime_GET_YEAR(obj) as u16).to_le_bytes());
        fixed.push(ffi::PyDateTime_GET_MONTH(obj) as u8);
        fixed.push(ffi::PyDateTime_GET_DAY(obj) as u8);
        fixed.push(ffi::PyDateTime_DATE_GET_HOUR(obj) as u8);
        fixed.push(ffi::PyDateTime_DATE_GET_MINUTE(obj) as u8);
        fixed.push(ffi::PyDateTime_DATE_GET_SECOND(obj) as u8);
        fixed.extend_from_slice(&(ffi::PyDateTime_DATE_GET_MICROSECOND(obj) as u32).to_le_bytes());
        fixed.push(ffi::PyDateTime_DATE_GET_FOLD(obj) as u8);
        let tz = ffi::PyDateTime_DATE_GET_TZINFO(obj);
        self.zoned(any, wire::TAG_DATETIME, &fixed, tz)
    }

    unsafe fn time(&mut self, any: &Bound<'_, PyAny>) -> Result<(), EncodeError> {
        let obj = any.as_ptr();
        let mut fixed = Vec::with_capacity(wire::TIME_FIXED);
        fixed.push(ffi::PyDateTime_TIME_GET_HOUR(obj) as u8);
        fixed.push(ffi::PyDateTime_TIME_GET_MINUTE(obj) as u8);
        fixed.push(ffi::PyDateTime_TIME_GET_SECOND(obj) as u8);
        fixed.extend_from_slice(&(ffi::PyDateTime_TIME_GET_MICROSECOND(obj) as u32).to_le_bytes());
        fixed.push(ffi::PyDateTime_TIME_GET_FOLD(obj) as u8);
        let tz = ffi::PyDateTime_TIME_GET_TZINFO(obj);
        self.zoned(any, wire::TAG_TIME, &fixed, tz)
    }

    /// A datetime or time: its fixed part then its tz; one whose tzinfo kameo cannot send is
    /// pickled when allowed.
    unsafe fn zoned(
        &mut self,
        any: &Bound<'_, PyAny>,
        tag: u8,
        fixed: &[u8],
        tz: *mut ffi::PyObject,
    ) -> Result<(), EncodeError> {
        match self.tz(any.py(), tz) {
            Ok(tz) => {
                self.out.push(tag);
                self.out.extend_from_slice(fixed);
                tz.write(self.out);
                Ok(())
            }
            Err(_) if self.opts.allow_pickle => self.pickled(any),
            Err(e) => Err(e.at(Step::Attr("tzinfo".into()), any.as_ptr())),
        }
    }

    /// UTC, fixed offsets (`datetime.timezone`, with their name) and zoneinfo zones (by key).
    unsafe fn tz(&mut self, py: Python<'_>, tz: *mut ffi::PyObject) -> Result<Tz, EncodeError> {
        if tz == ffi::Py_None() {
            return Ok(Tz::Naive);
        }
        if tz == ffi::PyDateTime_TimeZone_UTC() {
            return Ok(Tz::Utc);
        }
        let tz = Bound::from_borrowed_ptr(py, tz);
        let utc = Bound::from_borrowed_ptr(py, ffi::PyDateTime_TimeZone_UTC());
        if tz.get_type().is(utc.get_type()) {
            // datetime.timezone: the offset, and the name unless it is the default one.
            let fixed = (|| -> PyResult<Tz> {
                let offset = tz.call_method1("utcoffset", (py.None(),))?;
                let o = offset.as_ptr();
                let us = i64::from(ffi::PyDateTime_DELTA_GET_DAYS(o)) * 86_400_000_000
                    + i64::from(ffi::PyDateTime_DELTA_GET_SECONDS(o)) * 1_000_000
                    + i64::from(ffi::PyDateTime_DELTA_GET_MICROSECONDS(o));
                let name: String = tz.call_method1("tzname", (py.None(),))?.extract()?;
                let unnamed = utc.get_type().call1((offset,))?;
                let default: String = unnamed.call_method1("tzname", (py.None(),))?.extract()?;
                Ok(Tz::Fixed {
                    offset_us: us,
                    name: (name != default).then_some(name),
                })
            })();
            return fixed.map_err(|e| py_err("cannot encode timezone", e));
        }
        if let Some(zi) = refs::loaded(py, "zoneinfo") {
            if let Ok(cls) = zi.getattr("ZoneInfo") {
                if tz.is_instance(&cls).unwrap_or(false) {
                    let key: Option<String> =
                        tz.getattr("key").and_then(|k| k.extract()).unwrap_or(None);
                    return match key {
                        Some(k) => Ok(Tz::Zone(k)),
                        None => Err(EncodeError::new(
                            "a ZoneInfo loaded from a file (no key) cannot be sent".into(),
                        )),
                    };
                }
            }
        }
        Err(EncodeError::new(format!(
            "cannot encode tzinfo of type {} (kameo sends datetime.timezone and zoneinfo.ZoneInfo; pass allow_pickle=True for others)",
            type_name(tz.as_ptr())
        )))
    }

    fn class(&mut self, tag: u8, cls: &Bound<'_, PyAny>, what: &str) -> Result<(), EncodeError> {
        let (module, qualname) = refs::class_path(cls)
            .map_err(|why| EncodeError::new(format!("cannot encode {what}: {why}")))?;
        self.out.push(tag);
        put_str(self.out, &module);
        put_str(self.out, &qualname);
        Ok(())
    }

    /// `tag` and the class of `any` (a `kind` such as "dataclass"), for a value whose payload
    /// follows one level deeper.
    fn class_of(
        &mut self,
        tag: u8,
        any: &Bound<'_, PyAny>,
        kind: &str,
        depth: usize,
    ) -> Result<(), EncodeError> {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let what = format!("{kind} {}", type_name(any.as_ptr()));
        self.class(tag, &any.get_type().into_any(), &what)
    }

    unsafe fn enum_member(
        &mut self,
        any: &Bound<'_, PyAny>,
        depth: usize,
    ) -> Result<(), EncodeError> {
        self.class_of(wire::TAG_ENUM, any, "enum member", depth)?;
        let value = any
            .getattr("_value_")
            .map_err(|e| py_err("cannot read the enum member's value", e))?;
        self.value(value.as_ptr(), depth + 1)
            .map_err(|e| e.at(Step::Attr("value".into()), any.as_ptr()))
    }

    unsafe fn named_tuple(
        &mut self,
        any: &Bound<'_, PyAny>,
        depth: usize,
    ) -> Result<(), EncodeError> {
        let cls = any.get_type().into_any();
        self.class(
            wire::TAG_NAMEDTUPLE,
            &cls,
            &format!("NamedTuple {}", type_name(any.as_ptr())),
        )?;
        // Same payload as a tuple, without the tag the class replaced.
        let mark = self.out.len();
        self.tuple(any.as_ptr(), wire::TAG_TUPLE, depth)
            .map_err(|e| self.name_fields(e, any))?;
        self.out.remove(mark);
        Ok(())
    }

    /// NamedTuple errors name the field rather than the index.
    fn name_fields(&self, mut e: EncodeError, any: &Bound<'_, PyAny>) -> EncodeError {
        if let (Some(Step::Index(i)), Ok(fields)) = (e.steps.last(), any.getattr("_fields")) {
            if let Ok(name) = fields.get_item(*i).and_then(|n| n.extract::<String>()) {
                *e.steps.last_mut().expect("checked") = Step::Attr(name);
            }
        }
        e
    }

    unsafe fn dataclass(
        &mut self,
        any: &Bound<'_, PyAny>,
        depth: usize,
    ) -> Result<(), EncodeError> {
        self.class_of(wire::TAG_DATACLASS, any, "dataclass", depth)?;
        let py = any.py();
        let fields = refs::dataclass_fields(py)
            .and_then(|f| f.call1((any,)))
            .and_then(|f| f.try_iter()?.collect::<PyResult<Vec<_>>>())
            .map_err(|e| py_err("cannot list dataclass fields", e))?;
        put_varint(self.out, fields.len() as u64);
        for field in fields {
            let name: String = field
                .getattr("name")
                .and_then(|n| n.extract())
                .map_err(|e| py_err("bad dataclass field", e))?;
            let value = any.getattr(name.as_str()).map_err(|e| {
                py_err(&format!("cannot read field {name}"), e)
                    .at(Step::Attr(name.clone()), any.as_ptr())
            })?;
            put_str(self.out, &name);
            self.value(value.as_ptr(), depth + 1)
                .map_err(|e| e.at(Step::Attr(name), any.as_ptr()))?;
        }
        Ok(())
    }

    /// A numpy array (or a 0-d array standing for a scalar): dtype, shape, order, data.
    unsafe fn ndarray(
        &mut self,
        arr: &Bound<'_, PyAny>,
        tag: u8,
        depth: usize,
    ) -> Result<(), EncodeError> {
        let py = arr.py();
        let err = |e: PyErr| py_err("cannot encode numpy array", e);
        let dtype = arr.getattr("dtype").map_err(err)?;
        if dtype
            .getattr("hasobject")
            .and_then(|h| h.is_truthy())
            .map_err(err)?
        {
            return Err(EncodeError::new(format!(
                "cannot encode numpy array of dtype {} (it holds Python objects; convert it to a list)",
                dtype.str().map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        let descr = refs::dtype_to_descr(py)
            .and_then(|f| f.call1((&dtype,)))
            .map_err(err)?;
        let shape: Vec<u64> = arr
            .getattr("shape")
            .and_then(|s| s.extract())
            .map_err(err)?;
        let flags = arr.getattr("flags").map_err(err)?;
        let c = flags
            .getattr("c_contiguous")
            .and_then(|f| f.is_truthy())
            .map_err(err)?;
        let f = flags
            .getattr("f_contiguous")
            .and_then(|f| f.is_truthy())
            .map_err(err)?;
        let fortran = !c && f;
        let source = if c || f {
            arr.clone()
        } else {
            refs::numpy_ascontiguous(py)
                .and_then(|g| g.call1((arr,)))
                .map_err(err)?
        };
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs
            .set_item("order", if fortran { "F" } else { "C" })
            .map_err(err)?;
        let flat = source
            .call_method("reshape", (-1,), Some(&kwargs))
            .and_then(|a| a.call_method1("view", ("u1",)))
            .map_err(err)?;
        let mut view: ffi::Py_buffer = std::mem::zeroed();
        if ffi::PyObject_GetBuffer(flat.as_ptr(), &mut view, ffi::PyBUF_SIMPLE) != 0 {
            return Err(err(PyErr::fetch(py)));
        }
        let data = if view.len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(view.buf as *const u8, view.len as usize)
        };
        let r = self.array_payload(py, tag, &descr, &shape, fortran, &source, data, depth);
        ffi::PyBuffer_Release(&mut view);
        r
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn array_payload(
        &mut self,
        py: Python<'_>,
        tag: u8,
        descr: &Bound<'_, PyAny>,
        shape: &[u64],
        fortran: bool,
        source: &Bound<'_, PyAny>,
        data: &[u8],
        depth: usize,
    ) -> Result<(), EncodeError> {
        self.out.push(tag);
        self.value(descr.as_ptr(), depth + 1)?;
        put_varint(self.out, shape.len() as u64);
        for d in shape {
            put_varint(self.out, *d);
        }
        self.out.push(u8::from(fortran));
        if tag == wire::TAG_NDARRAY && data.len() >= self.opts.shm_threshold {
            // An array that is already a view on a received segment is passed on as it is.
            let (fd, offset) = match shm_base(source)
                .and_then(|v| v.get().locate(data.as_ptr() as usize, data.len()))
            {
                Some(found) => found,
                None => {
                    let fd = match (&self.opts.recycler, self.opts.arrays) {
                        (Some(r), Arrays::Parent) => r.send_copy(data),
                        _ => shm::create_sealed(data),
                    };
                    let fd = fd.map_err(|e| {
                        EncodeError::new(format!("cannot create shared memory: {e}"))
                    })?;
                    (Arc::new(fd), 0)
                }
            };
            let idx = self.add_segment(fd)?;
            self.out.push(wire::DATA_SHM);
            wire::ShmRef {
                fd: idx,
                offset,
                len: data.len() as u64,
            }
            .write(self.out);
        } else {
            let _ = py;
            self.out.push(wire::DATA_INLINE);
            put_varint(self.out, data.len() as u64);
            self.out.extend_from_slice(data);
        }
        Ok(())
    }
}

/// Types whose encoding runs no Python code.
#[inline(always)]
unsafe fn is_scalar(ty: *mut ffi::PyTypeObject) -> bool {
    ty == type_ptr!(PyUnicode_Type) || ty == type_ptr!(PyLong_Type) || ty == type_ptr!(PyFloat_Type)
}

/// Append `tag`, varint `n` and the `n` bytes at `p`, with one capacity check.
#[inline(always)]
unsafe fn put_tagged(out: &mut Vec<u8>, tag: u8, p: *const u8, n: usize) {
    out.reserve(1 + 10 + n);
    let len = out.len();
    let dst = out.as_mut_ptr().add(len);
    *dst = tag;
    let mut i = 1;
    let mut v = n as u64;
    while v >= 0x80 {
        *dst.add(i) = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    *dst.add(i) = v as u8;
    i += 1;
    if n <= 16 {
        // Short strs (keys) are the common case: a byte loop beats a memcpy call.
        for j in 0..n {
            *dst.add(i + j) = *p.add(j);
        }
    } else {
        std::ptr::copy_nonoverlapping(p, dst.add(i), n);
    }
    out.set_len(len + i + n);
}

/// Append `tag` and 8 bytes, with one capacity check.
#[inline(always)]
fn put_fixed(out: &mut Vec<u8>, tag: u8, bytes: [u8; 8]) {
    out.reserve(9);
    let len = out.len();
    // SAFETY: 9 bytes were reserved past len.
    unsafe {
        let dst = out.as_mut_ptr().add(len);
        *dst = tag;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.add(1), 8);
        out.set_len(len + 9);
    }
}

/// The contents of a `bytes` object (or subclass), borrowed for as long as the caller holds it.
unsafe fn bytes_data<'o>(obj: *mut ffi::PyObject) -> &'o [u8] {
    let size = ffi::PyBytes_Size(obj) as usize;
    std::slice::from_raw_parts(ffi::PyBytes_AS_STRING(obj) as *const u8, size)
}

/// The shared-memory mapping at the root of an array's `.base` chain, if any.
fn shm_base<'py>(arr: &Bound<'py, PyAny>) -> Option<Bound<'py, ShmView>> {
    let mut obj = arr.clone();
    for _ in 0..64 {
        let base = obj.getattr("base").ok()?;
        if base.is_none() {
            return None;
        }
        if let Ok(view) = base.cast::<ShmView>() {
            return Some(view.clone());
        }
        // numpy.frombuffer keeps the exporter behind a memoryview.
        if let Ok(mv) = base.cast::<pyo3::types::PyMemoryView>() {
            return mv.getattr("obj").ok()?.cast_into::<ShmView>().ok();
        }
        obj = base;
    }
    None
}
