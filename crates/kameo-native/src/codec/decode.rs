//! Bytes to Python values.
//!
//! Every length is checked against the input before anything is allocated, every constructor
//! failure becomes a [`DecodeError`], and a pickled value is refused unless the connection
//! allows pickle. Classes named by enum, dataclass and NamedTuple values are imported by module
//! and qualname and must be of that kind; nothing else named in the input is ever called.

use super::{refs, Arrays, Options};
use crate::shm::ShmView;
use kameo_core::shm;
use kameo_proto::wire::{self, DecodeError, Reader, ShmRef, Tz, MAX_DEPTH};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};
use std::cell::RefCell;
use std::ffi::c_char;
use std::os::fd::OwnedFd;
use std::sync::Arc;

unsafe extern "C" {
    /// A dict with room for `minused` items (CPython 3.8-3.12 export it; saves resizes).
    fn _PyDict_NewPresized(minused: ffi::Py_ssize_t) -> *mut ffi::PyObject;
}

/// Why a value could not be decoded.
pub enum DecodeFail {
    /// Malformed or refused input.
    Codec(DecodeError),
    /// The remote reference hook (`Options::ref_hook`) raised this exception.
    Hook(PyErr),
}

impl std::fmt::Display for DecodeFail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeFail::Codec(e) => e.fmt(f),
            DecodeFail::Hook(e) => write!(f, "remote object reference refused: {e}"),
        }
    }
}

/// Decode one value spanning all of `buf`; `segs` are the shared-memory segments that came
/// with the frame. An exception of the remote reference hook is only described (see
/// [`decode_full`]).
pub fn decode<'py>(
    py: Python<'py>,
    buf: &[u8],
    opts: &Options,
    segs: &[Arc<OwnedFd>],
) -> Result<Bound<'py, PyAny>, DecodeError> {
    decode_full(py, buf, opts, segs).map_err(|e| match e {
        DecodeFail::Codec(e) => e,
        DecodeFail::Hook(e) => DecodeError::Refused {
            at: 0,
            why: format!("remote object reference refused: {e}"),
        },
    })
}

/// As [`decode`], keeping the exception the remote reference hook raised.
pub fn decode_full<'py>(
    py: Python<'py>,
    buf: &[u8],
    opts: &Options,
    segs: &[Arc<OwnedFd>],
) -> Result<Bound<'py, PyAny>, DecodeFail> {
    // The str cache is borrowed for the whole decode (a nested decode, from Python code a
    // class runs, goes without it).
    STR_CACHE.with(|cache| {
        let mut cache = cache.try_borrow_mut().ok();
        let d = Decoder {
            py,
            r: Reader::new(buf),
            opts,
            segs,
            cache: cache.as_deref_mut(),
            keys: LastKeys { slots: None },
            shared: Vec::new(),
            hook_err: None,
        };
        run(d, buf.len())
    })
}

fn run<'py>(mut d: Decoder<'_, 'py>, len: usize) -> Result<Bound<'py, PyAny>, DecodeFail> {
    // Building thousands of containers would run the cyclic GC several times over objects
    // that cannot be garbage yet; pause it for the decode (it runs at the next allocation).
    // SAFETY: the GIL is held.
    let was_enabled = len > 4096 && unsafe { ffi::PyGC_Disable() } == 1;
    let v = d.value(0);
    if was_enabled {
        // SAFETY: as above.
        unsafe { ffi::PyGC_Enable() };
    }
    let v = v.map_err(|e| match d.hook_err.take() {
        Some(exc) => DecodeFail::Hook(exc),
        None => DecodeFail::Codec(e),
    })?;
    d.r.finish().map_err(DecodeFail::Codec)?;
    Ok(v)
}

/// The short str keys and values of the last dict decoded at each of the nesting levels 1 to
/// 4, by position: records in a list repeat the same keys in the same order, and often the
/// same values in a field (a symbol, a side), so the str at key or value position i is
/// usually the one at position i of the previous dict at that level, and checking that is
/// cheaper than the str cache (the object is at hand and hot). Holds a reference to each;
/// allocated at the first nested dict (a lone top-level dict has nothing to repeat).
struct LastKeys {
    slots: Option<Box<[*mut ffi::PyObject; LAST_KEYS_SLOTS]>>,
}

const LAST_KEYS_LEVELS: usize = 4;
const LAST_KEYS_PER_DICT: usize = 16;
/// Keys, then values.
const LAST_KEYS_SLOTS: usize = 2 * LAST_KEYS_LEVELS * LAST_KEYS_PER_DICT;

impl LastKeys {
    /// The slot of the key (`value` false) or value at position i of a dict at `depth`.
    #[inline(always)]
    fn slot(depth: usize, i: usize, value: bool) -> Option<usize> {
        ((1..=LAST_KEYS_LEVELS).contains(&depth) && i < LAST_KEYS_PER_DICT).then(|| {
            usize::from(value) * LAST_KEYS_LEVELS * LAST_KEYS_PER_DICT
                + (depth - 1) * LAST_KEYS_PER_DICT
                + i
        })
    }

    /// If the next value is a str equal to the one remembered at (depth, i, value): consume it
    /// and return a new reference to that str.
    #[inline(always)]
    fn hit(
        &self,
        r: &mut Reader<'_>,
        depth: usize,
        i: usize,
        value: bool,
    ) -> Option<*mut ffi::PyObject> {
        let k = self.slots.as_ref()?[Self::slot(depth, i, value)?];
        if k.is_null() {
            return None;
        }
        // SAFETY: k is a compact ASCII str we hold a reference to (see `remember`).
        unsafe {
            let n = ffi::PyUnicode_GET_LENGTH(k) as usize;
            let rest = r.rest();
            // Tag, one-byte length (keys kept are at most STR_CACHE_MAX_LEN long), bytes.
            if rest.len() < 2 + n || rest[0] != wire::TAG_STR || usize::from(rest[1]) != n {
                return None;
            }
            let data = std::slice::from_raw_parts(ffi::PyUnicode_1BYTE_DATA(k), n);
            if !eq_short(&rest[2..2 + n], data) {
                return None;
            }
            r.take(2 + n).ok()?;
            Some(ffi::Py_NewRef(k))
        }
    }

    /// Keep `k` as the str at (depth, i, value) if it is a short compact ASCII str.
    #[inline(always)]
    fn remember(&mut self, depth: usize, i: usize, value: bool, k: *mut ffi::PyObject) {
        let Some(s) = Self::slot(depth, i, value) else {
            return;
        };
        // SAFETY: k is a live object; the GIL is held.
        unsafe {
            if ffi::Py_TYPE(k) != &raw mut ffi::PyUnicode_Type
                || ffi::PyUnicode_IS_COMPACT_ASCII(k) == 0
                || ffi::PyUnicode_GET_LENGTH(k) as usize > STR_CACHE_MAX_LEN
            {
                return;
            }
            let slots = self
                .slots
                .get_or_insert_with(|| Box::new([std::ptr::null_mut(); LAST_KEYS_SLOTS]));
            let old = std::mem::replace(&mut slots[s], ffi::Py_NewRef(k));
            if !old.is_null() {
                ffi::Py_DECREF(old);
            }
        }
    }
}

impl Drop for LastKeys {
    fn drop(&mut self) {
        for &k in self.slots.iter().flat_map(|s| s.iter()) {
            if !k.is_null() {
                // SAFETY: a reference we hold; decoding runs with the GIL held.
                unsafe { ffi::Py_DECREF(k) };
            }
        }
    }
}

struct Decoder<'b, 'py> {
    py: Python<'py>,
    r: Reader<'b>,
    opts: &'b Options,
    segs: &'b [Arc<OwnedFd>],
    cache: Option<&'b mut StrCache>,
    keys: LastKeys,
    /// The shared lists and dicts (TAG_SHARED) decoded so far, in the order they ended.
    shared: Vec<Py<PyAny>>,
    /// The exception the remote reference hook raised, if it did.
    hook_err: Option<PyErr>,
}

fn owned<'py>(
    py: Python<'py>,
    p: *mut ffi::PyObject,
    at: usize,
) -> Result<Bound<'py, PyAny>, DecodeError> {
    // SAFETY: p is a new reference returned by a C API constructor (or null on failure).
    match unsafe { Bound::from_owned_ptr_or_opt(py, p) } {
        Some(b) => Ok(b),
        None => Err(refused(at, PyErr::take(py))),
    }
}

fn refused(at: usize, err: Option<PyErr>) -> DecodeError {
    DecodeError::Refused {
        at,
        why: match err {
            Some(e) => format!("value rejected by Python: {e}"),
            None => "value rejected by Python".into(),
        },
    }
}

fn py_refused(at: usize) -> impl Fn(PyErr) -> DecodeError {
    move |e| DecodeError::Refused {
        at,
        why: e.to_string(),
    }
}

/// Short strs decoded recently, reused across messages: records repeat the same keys and many
/// of the same values, and one lookup is cheaper than decoding and allocating a new str
/// (pickle gets a similar effect within one message from its memo). Direct-mapped by a hash
/// of the bytes; a collision just replaces the entry.
const STR_CACHE_SLOTS: usize = 1024;
const STR_CACHE_MAX_LEN: usize = 32;

/// (hash of the bytes, the str) per slot.
type StrSlot = Option<(u64, Py<PyAny>)>;
type StrCache = Vec<StrSlot>;

thread_local! {
    static STR_CACHE: RefCell<StrCache> =
        RefCell::new((0..STR_CACHE_SLOTS).map(|_| None).collect());
}

#[inline(always)]
fn load_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn load_u32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(
        b[at..at + 4].try_into().expect("4 bytes"),
    ))
}

/// The slot hash of a short str's bytes (at most `STR_CACHE_MAX_LEN`): a few overlapping
/// words, not every byte; equal hashes are confirmed by comparing the bytes.
#[inline(always)]
fn hash_short(b: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let n = b.len();
    let (x, y) = if n >= 16 {
        (
            load_u64(b, 0) ^ load_u64(b, n / 2 - 4).rotate_left(17),
            load_u64(b, n - 8),
        )
    } else if n >= 8 {
        (load_u64(b, 0), load_u64(b, n - 8))
    } else if n >= 4 {
        (load_u32(b, 0), load_u32(b, n - 4))
    } else if n > 0 {
        (
            u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16,
            0,
        )
    } else {
        (0, 0)
    };
    let h = (x ^ (n as u64)).wrapping_mul(K).rotate_left(29) ^ y;
    h.wrapping_mul(K) ^ (h >> 32)
}

/// `a == b` for two slices of the same length at most `STR_CACHE_MAX_LEN`, without a call.
#[inline(always)]
fn eq_short(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n >= 8 {
        let mut i = 0;
        while i + 8 < n {
            if load_u64(a, i) != load_u64(b, i) {
                return false;
            }
            i += 8;
        }
        load_u64(a, n - 8) == load_u64(b, n - 8)
    } else if n >= 4 {
        load_u32(a, 0) == load_u32(b, 0) && load_u32(a, n - 4) == load_u32(b, n - 4)
    } else {
        // 0 to 3 bytes ("id", "qty"): first, middle and last byte cover them all.
        n == 0 || (a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1])
    }
}

/// A new str from UTF-8 bytes, with a copy (no validation pass) for pure ASCII.
unsafe fn new_str(b: &[u8]) -> *mut ffi::PyObject {
    if b.is_ascii() {
        new_ascii(b)
    } else {
        ffi::PyUnicode_DecodeUTF8(
            b.as_ptr() as *const c_char,
            b.len() as ffi::Py_ssize_t,
            std::ptr::null(),
        )
    }
}

/// A new str from bytes known to be ASCII.
#[inline]
unsafe fn new_ascii(b: &[u8]) -> *mut ffi::PyObject {
    let p = ffi::PyUnicode_New(b.len() as ffi::Py_ssize_t, 127);
    if !p.is_null() {
        std::ptr::copy_nonoverlapping(b.as_ptr(), ffi::PyUnicode_1BYTE_DATA(p), b.len());
    }
    p
}

/// The str for the bytes `b` if they are ASCII: from the cache when they are short. Only
/// compact ASCII strs are cached, so a hit is a length check and a comparison of the bytes.
/// Null (without an exception) when `b` is not ASCII; null with an exception when Python
/// cannot allocate the str.
#[inline]
unsafe fn cached_ascii(cache: &mut StrCache, b: &[u8]) -> *mut ffi::PyObject {
    if b.len() > STR_CACHE_MAX_LEN {
        return if b.is_ascii() {
            new_ascii(b)
        } else {
            std::ptr::null_mut()
        };
    }
    let h = hash_short(b);
    let slot = cache.get_unchecked_mut((h as usize) % STR_CACHE_SLOTS);
    if let Some((eh, s)) = slot {
        let p = s.as_ptr();
        if *eh == h
            && ffi::PyUnicode_GET_LENGTH(p) as usize == b.len()
            && eq_short(
                std::slice::from_raw_parts(ffi::PyUnicode_1BYTE_DATA(p), b.len()),
                b,
            )
        {
            return ffi::Py_NewRef(p);
        }
    }
    if !b.is_ascii() {
        return std::ptr::null_mut();
    }
    let p = new_ascii(b);
    if !p.is_null() {
        *slot = Some((
            h,
            Bound::from_borrowed_ptr(Python::assume_attached(), p).unbind(),
        ));
    }
    p
}

impl<'b, 'py> Decoder<'b, 'py> {
    fn value(&mut self, depth: usize) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        let r = &mut self.r;
        let at = r.pos();
        let tag = r.u8()?;
        // SAFETY (all blocks below): the GIL is held; every pointer passed to the C API is
        // either a fresh reference we own or a buffer slice that outlives the call.
        unsafe {
            match tag {
                wire::TAG_NONE => Ok(py.None().into_bound(py)),
                wire::TAG_FALSE => owned(py, ffi::Py_NewRef(ffi::Py_False()), at),
                wire::TAG_TRUE => owned(py, ffi::Py_NewRef(ffi::Py_True()), at),
                wire::TAG_INT => {
                    let v = r.i64()?;
                    owned(py, ffi::PyLong_FromLongLong(v), at)
                }
                wire::TAG_FLOAT => {
                    let v = r.f64()?;
                    owned(py, ffi::PyFloat_FromDouble(v), at)
                }
                wire::TAG_STR => {
                    let n = r.len(1)?;
                    let b = r.take(n)?;
                    if let Some(cache) = self.cache.as_deref_mut() {
                        // A hit is equal to a cached ASCII str, so it needs no other check.
                        let p = cached_ascii(cache, b);
                        if !p.is_null() || !ffi::PyErr_Occurred().is_null() {
                            return owned(py, p, at);
                        }
                    } else if b.is_ascii() {
                        return owned(py, new_ascii(b), at);
                    }
                    if std::str::from_utf8(b).is_err() {
                        return Err(DecodeError::BadUtf8 { at });
                    }
                    owned(py, new_str(b), at)
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
                        let item = self.value(depth + 1)?;
                        ffi::PyList_SET_ITEM(list.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr());
                    }
                    Ok(list)
                }
                wire::TAG_TUPLE => {
                    if depth >= MAX_DEPTH {
                        return Err(DecodeError::TooDeep);
                    }
                    let n = r.len(1)?;
                    self.tuple_items(n, depth, at)
                }
                wire::TAG_DICT => {
                    if depth >= MAX_DEPTH {
                        return Err(DecodeError::TooDeep);
                    }
                    let n = r.len(2)?;
                    let dict = owned(py, _PyDict_NewPresized(n as ffi::Py_ssize_t), at)?;
                    for i in 0..n {
                        let (k, v) = if depth == 0 {
                            // A top-level dict has no previous dict at its level.
                            (self.value(depth + 1)?, self.value(depth + 1)?)
                        } else {
                            (
                                self.repeated_str(depth, i, false, at)?,
                                self.repeated_str(depth, i, true, at)?,
                            )
                        };
                        if ffi::PyDict_SetItem(dict.as_ptr(), k.as_ptr(), v.as_ptr()) != 0 {
                            let _ = PyErr::take(py);
                            return Err(DecodeError::Invalid {
                                at,
                                why: "unhashable dict key",
                            });
                        }
                    }
                    Ok(dict)
                }
                wire::TAG_REF => {
                    let i = r.shared_ref()?;
                    match self.shared.get(i as usize) {
                        Some(v) => Ok(v.bind(py).clone()),
                        None => Err(DecodeError::Invalid {
                            at,
                            why: "reference to a shared value that is not complete",
                        }),
                    }
                }
                tag => self.other(tag, at, depth),
            }
        }
    }

    /// The key (`value` false) or value at position i of a dict at `depth`: the str at that
    /// position of the previous dict at this level if it is the same, else decoded.
    #[inline(always)]
    fn repeated_str(
        &mut self,
        depth: usize,
        i: usize,
        value: bool,
        at: usize,
    ) -> Result<Bound<'py, PyAny>, DecodeError> {
        // Numbers are the other common field values: made here, without a call of `value`.
        let scalar = match self.r.peek() {
            Some(wire::TAG_INT) if value => Some(true),
            Some(wire::TAG_FLOAT) if value => Some(false),
            _ => None,
        };
        if let Some(int) = scalar {
            self.r.u8()?;
            // SAFETY: the GIL is held.
            let p = unsafe {
                if int {
                    ffi::PyLong_FromLongLong(self.r.i64()?)
                } else {
                    ffi::PyFloat_FromDouble(self.r.f64()?)
                }
            };
            return owned(self.py, p, at);
        }
        match self.keys.hit(&mut self.r, depth, i, value) {
            Some(s) => owned(self.py, s, at),
            None => {
                let v = self.value(depth + 1)?;
                self.keys.remember(depth, i, value, v.as_ptr());
                Ok(v)
            }
        }
    }

    unsafe fn tuple_items(
        &mut self,
        n: usize,
        depth: usize,
        at: usize,
    ) -> Result<Bound<'py, PyAny>, DecodeError> {
        let tuple = owned(self.py, ffi::PyTuple_New(n as ffi::Py_ssize_t), at)?;
        for i in 0..n {
            let item = self.value(depth + 1)?;
            ffi::PyTuple_SET_ITEM(tuple.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr());
        }
        Ok(tuple)
    }

    /// Everything beyond the JSON-like core, out of line to keep `value`'s frame small.
    #[inline(never)]
    fn other(
        &mut self,
        tag: u8,
        at: usize,
        depth: usize,
    ) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        // SAFETY: as in `value`.
        unsafe {
            match tag {
                wire::TAG_BIGINT => {
                    let n = self.r.len(1)?;
                    let b = self.r.take(n)?;
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("signed", true).map_err(py_refused(at))?;
                    py.get_type::<pyo3::types::PyInt>()
                        .call_method("from_bytes", (PyBytes::new(py, b), "little"), Some(&kwargs))
                        .map_err(py_refused(at))
                }
                wire::TAG_COMPLEX => {
                    let re = self.r.f64()?;
                    let im = self.r.f64()?;
                    owned(py, ffi::PyComplex_FromDoubles(re, im), at)
                }
                wire::TAG_SET | wire::TAG_FROZENSET => {
                    if depth >= MAX_DEPTH {
                        return Err(DecodeError::TooDeep);
                    }
                    let n = self.r.len(1)?;
                    let set = if tag == wire::TAG_SET {
                        owned(py, ffi::PySet_New(std::ptr::null_mut()), at)?
                    } else {
                        owned(py, ffi::PyFrozenSet_New(std::ptr::null_mut()), at)?
                    };
                    for _ in 0..n {
                        let item = self.value(depth + 1)?;
                        if ffi::PySet_Add(set.as_ptr(), item.as_ptr()) != 0 {
                            let _ = PyErr::take(py);
                            return Err(DecodeError::Invalid {
                                at,
                                why: "unhashable set member",
                            });
                        }
                    }
                    Ok(set)
                }
                wire::TAG_BYTEARRAY => {
                    let n = self.r.len(1)?;
                    let b = self.r.take(n)?;
                    owned(
                        py,
                        ffi::PyByteArray_FromStringAndSize(
                            b.as_ptr() as *const c_char,
                            n as ffi::Py_ssize_t,
                        ),
                        at,
                    )
                }
                wire::TAG_DATETIME | wire::TAG_DATE | wire::TAG_TIME | wire::TAG_TIMEDELTA => {
                    self.temporal(tag, at)
                }
                wire::TAG_DECIMAL => {
                    let s = self.r.str()?;
                    refs::decimal_class(py)
                        .and_then(|c| c.call1((s,)))
                        .map_err(py_refused(at))
                }
                wire::TAG_UUID => {
                    let b = self.r.take(16)?;
                    let kwargs = PyDict::new(py);
                    kwargs
                        .set_item("bytes", PyBytes::new(py, b))
                        .map_err(py_refused(at))?;
                    refs::uuid_class(py)
                        .and_then(|c| c.call((), Some(&kwargs)))
                        .map_err(py_refused(at))
                }
                wire::TAG_ENUM | wire::TAG_DATACLASS | wire::TAG_NAMEDTUPLE => {
                    if depth >= MAX_DEPTH {
                        return Err(DecodeError::TooDeep);
                    }
                    self.object(tag, at, depth)
                }
                wire::TAG_NDARRAY | wire::TAG_NPSCALAR => {
                    if depth >= MAX_DEPTH {
                        return Err(DecodeError::TooDeep);
                    }
                    self.ndarray(tag, at, depth)
                }
                wire::TAG_SUBCLASS => {
                    if depth >= MAX_DEPTH {
                        return Err(DecodeError::TooDeep);
                    }
                    self.subclass(at, depth)
                }
                wire::TAG_SHARED => {
                    // A list or dict follows (checked), which counts the depth.
                    self.r.shared_start()?;
                    let v = self.value(depth)?;
                    self.shared.push(v.clone().unbind());
                    self.r.shared_done();
                    Ok(v)
                }

                wire::TAG_PICKLE => {
                    let n = self.r.len(1)?;
                    let b = self.r.take(n)?;
                    if !self.opts.allow_pickle {
                        return Err(DecodeError::Refused {
                            at,
                            why: "the value is pickled (sent with allow_pickle=True) but this side does not allow pickle; pass allow_pickle=True to accept it".into(),
                        });
                    }
                    refs::pickle_loads(py)
                        .and_then(|f| f.call1((PyBytes::new(py, b),)))
                        .map_err(py_refused(at))
                }
                wire::TAG_SHM_BYTES => {
                    let bytearray = match self.r.u8()? {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(DecodeError::Invalid {
                                at,
                                why: "bad shared bytes kind",
                            })
                        }
                    };
                    let shm = ShmRef::read(&mut self.r)?;
                    self.shm_bytes(bytearray, shm, at)
                }
                wire::TAG_REMOTE => {
                    let (worker, number, type_name) = self.r.remote()?;
                    let opts = self.opts;
                    let Some(hook) = &opts.ref_hook else {
                        return Err(DecodeError::Refused {
                            at,
                            why: "a remote object reference arrived, but this side holds no remote objects".into(),
                        });
                    };
                    hook.bind(py)
                        .call1((worker, number, type_name))
                        .map_err(|e| {
                            let why = format!("remote object reference refused: {e}");
                            self.hook_err = Some(e);
                            DecodeError::Refused { at, why }
                        })
                }
                tag => Err(DecodeError::UnknownTag { tag, at }),
            }
        }
    }

    /// The frame's descriptor `shm` refers to, checked (see [`shm::verify`]; `frozen`: we keep
    /// a view on it, so its sender must not be able to change it).
    fn segment(
        &self,
        shm: &ShmRef,
        at: usize,
        frozen: bool,
    ) -> Result<(Arc<OwnedFd>, u64), DecodeError> {
        let fd = usize::try_from(shm.fd)
            .ok()
            .and_then(|i| self.segs.get(i))
            .ok_or(DecodeError::Invalid {
                at,
                why: "shared memory reference to a descriptor the frame did not carry",
            })?;
        let size = shm::verify(fd, shm.offset, shm.len, frozen)
            .map_err(|why| DecodeError::Refused { at, why })?;
        Ok((fd.clone(), size))
    }

    /// Whether an array may be a view on the segment `shm` refers to: only if nobody but a
    /// trusted process can change it (see [`crate::codec::Arrays`]).
    fn may_view(&self, shm: &ShmRef, at: usize) -> Result<bool, DecodeError> {
        let (fd, _) = self.segment(shm, at, false)?;
        Ok(shm::is_frozen(&fd)
            || match self.opts.arrays {
                Arrays::Sealed => false,
                Arrays::Worker => true,
                Arrays::Parent => self.opts.recycler.as_ref().is_some_and(|r| r.holds(&fd)),
            })
    }

    unsafe fn shm_bytes(
        &mut self,
        bytearray: bool,
        shm: ShmRef,
        at: usize,
    ) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        // Copied out once, here: a recycled segment (see `shm::Recycler`) is fine.
        let (fd, _) = self.segment(&shm, at, false)?;
        let len = usize::try_from(shm.len).map_err(|_| DecodeError::Truncated { at })?;
        let (obj, p) = if bytearray {
            let o = owned(
                py,
                ffi::PyByteArray_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t),
                at,
            )?;
            let p = ffi::PyByteArray_AsString(o.as_ptr()) as usize;
            (o, p)
        } else {
            let o = owned(
                py,
                ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t),
                at,
            )?;
            let p = ffi::PyBytes_AS_STRING(o.as_ptr()) as usize;
            (o, p)
        };
        if len > 0 {
            // The object is new and referenced only here: nobody else touches its buffer while
            // the GIL is released for the copy.
            let offset = shm.offset;
            py.detach(|| {
                shm::read_into(
                    &fd,
                    offset,
                    std::slice::from_raw_parts_mut(p as *mut u8, len),
                )
            })
            .map_err(|e| DecodeError::Refused {
                at,
                why: format!("cannot read shared memory: {e}"),
            })?;
        }
        Ok(obj)
    }

    unsafe fn temporal(&mut self, tag: u8, at: usize) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        if ffi::PyDateTimeAPI().is_null() {
            ffi::PyDateTime_IMPORT();
            if ffi::PyDateTimeAPI().is_null() {
                return Err(refused(at, PyErr::take(py)));
            }
        }
        let api = &*ffi::PyDateTimeAPI();
        let r = &mut self.r;
        match tag {
            wire::TAG_DATE => {
                let (y, m, d) = (r.u16()?, r.u8()?, r.u8()?);
                owned(
                    py,
                    (api.Date_FromDate)(y.into(), m.into(), d.into(), api.DateType),
                    at,
                )
            }
            wire::TAG_TIMEDELTA => {
                let (d, s, us) = (r.i32()?, r.i32()?, r.i32()?);
                owned(py, (api.Delta_FromDelta)(d, s, us, 1, api.DeltaType), at)
            }
            wire::TAG_DATETIME => {
                let (y, mo, d) = (r.u16()?, r.u8()?, r.u8()?);
                let (h, mi, s, us, fold) = self.clock(at)?;
                let tz = self.tz(at)?;
                owned(
                    py,
                    (api.DateTime_FromDateAndTimeAndFold)(
                        y.into(),
                        mo.into(),
                        d.into(),
                        h,
                        mi,
                        s,
                        us,
                        tz.as_ptr(),
                        fold,
                        api.DateTimeType,
                    ),
                    at,
                )
            }
            _ => {
                let (h, mi, s, us, fold) = self.clock(at)?;
                let tz = self.tz(at)?;
                owned(
                    py,
                    (api.Time_FromTimeAndFold)(h, mi, s, us, tz.as_ptr(), fold, api.TimeType),
                    at,
                )
            }
        }
    }

    /// hour, minute, second, microsecond and fold of a datetime or time, as the C API takes
    /// them.
    fn clock(&mut self, at: usize) -> Result<(i32, i32, i32, i32, i32), DecodeError> {
        let r = &mut self.r;
        let (h, mi, s) = (r.u8()?, r.u8()?, r.u8()?);
        let (us, fold) = (r.u32()?, r.u8()?);
        let us = i32::try_from(us).map_err(|_| DecodeError::Invalid {
            at,
            why: "bad microsecond",
        })?;
        Ok((h.into(), mi.into(), s.into(), us, fold.into()))
    }

    unsafe fn tz(&mut self, at: usize) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        let api = &*ffi::PyDateTimeAPI();
        match Tz::read(&mut self.r)? {
            Tz::Naive => Ok(py.None().into_bound(py)),
            Tz::Utc => owned(py, ffi::Py_NewRef(api.TimeZone_UTC), at),
            Tz::Fixed { offset_us, name } => {
                let days = offset_us.div_euclid(86_400_000_000);
                let rest = offset_us.rem_euclid(86_400_000_000);
                let days = i32::try_from(days).map_err(|_| DecodeError::Invalid {
                    at,
                    why: "bad tz offset",
                })?;
                let delta = owned(
                    py,
                    (api.Delta_FromDelta)(
                        days,
                        (rest / 1_000_000) as i32,
                        (rest % 1_000_000) as i32,
                        1,
                        api.DeltaType,
                    ),
                    at,
                )?;
                let name = name.map(|n| pyo3::types::PyString::new(py, &n));
                let name_ptr = name.as_ref().map_or(std::ptr::null_mut(), |n| n.as_ptr());
                owned(
                    py,
                    (api.TimeZone_FromTimeZone)(delta.as_ptr(), name_ptr),
                    at,
                )
            }
            Tz::Zone(key) => refs::zoneinfo_class(py)
                .and_then(|c| c.call1((key,)))
                .map_err(py_refused(at)),
        }
    }

    fn object(
        &mut self,
        tag: u8,
        at: usize,
        depth: usize,
    ) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        let module = self.r.str()?;
        let qualname = self.r.str()?;
        let class = |accept: &dyn Fn(&Bound<'py, PyAny>) -> bool, what: &str| {
            refs::resolve_class(py, module, qualname, accept, what)
                .map_err(|why| DecodeError::Refused { at, why })
        };
        match tag {
            wire::TAG_ENUM => {
                let enum_cls = refs::enum_class(py).map_err(py_refused(at))?;
                let cls = class(
                    &|c| {
                        c.is_instance_of::<PyType>()
                            && c.cast::<PyType>()
                                .is_ok_and(|t| t.is_subclass(&enum_cls).unwrap_or(false))
                    },
                    "an Enum class",
                )?;
                let value = self.value(depth + 1)?;
                cls.call1((value,)).map_err(py_refused(at))
            }
            wire::TAG_NAMEDTUPLE => {
                let cls = class(
                    &|c| {
                        c.cast::<PyType>()
                            .is_ok_and(|t| t.is_subclass_of::<PyTuple>().unwrap_or(false))
                            && c.hasattr("_fields").unwrap_or(false)
                    },
                    "a NamedTuple class",
                )?;
                let n = self.r.len(1)?;
                // SAFETY: GIL held; tuple_items builds a fresh tuple.
                let items = unsafe { self.tuple_items(n, depth, at)? };
                let nfields = cls
                    .getattr("_fields")
                    .and_then(|f| f.len())
                    .map_err(py_refused(at))?;
                if nfields != n {
                    return Err(DecodeError::Refused {
                        at,
                        why: format!("{module}.{qualname} has {nfields} fields, the value has {n}"),
                    });
                }
                py.get_type::<PyTuple>()
                    .call_method1("__new__", (cls, items))
                    .map_err(py_refused(at))
            }
            _ => {
                let cls = class(
                    &|c| {
                        c.is_instance_of::<PyType>()
                            && c.hasattr("__dataclass_fields__").unwrap_or(false)
                    },
                    "a dataclass",
                )?;
                let known = cls
                    .getattr("__dataclass_fields__")
                    .map_err(py_refused(at))?;
                let obj = cls
                    .call_method1("__new__", (&cls,))
                    .map_err(py_refused(at))?;
                let setattr = py
                    .get_type::<pyo3::types::PyAny>()
                    .getattr("__setattr__")
                    .map_err(py_refused(at))?;
                let n = self.r.len(2)?;
                for _ in 0..n {
                    let name = self.r.str()?;
                    if !known.contains(name).unwrap_or(false) {
                        return Err(DecodeError::Refused {
                            at,
                            why: format!("{module}.{qualname} has no field {name:?}"),
                        });
                    }
                    let value = self.value(depth + 1)?;
                    setattr.call1((&obj, name, value)).map_err(py_refused(at))?;
                }
                Ok(obj)
            }
        }
    }

    /// An instance of a registered subclass of a built-in type. The class must be registered
    /// on this side too; the instance is made by the base type (`str.__new__(cls, value)`, or
    /// `list.__new__(cls)` then `list.extend`), without calling the class's own `__new__` or
    /// `__init__`.
    fn subclass(&mut self, at: usize, depth: usize) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        let module = self.r.str()?;
        let qualname = self.r.str()?;
        let cls = refs::resolve_class(
            py,
            module,
            qualname,
            |c| refs::is_registered(py, c),
            "a class registered with kameo.register_type",
        )
        .map_err(|why| DecodeError::Refused { at, why })?;
        let value = self.value(depth + 1)?;
        let refuse = |why: String| DecodeError::Refused { at, why };
        let cls = cls
            .cast_into::<PyType>()
            .map_err(|_| refuse(format!("{module}.{qualname} is not a class")))?;
        let base = refs::builtin_base(&cls)
            .ok_or_else(|| refuse(format!("{module}.{qualname} has no built-in base")))?;
        if !value.get_type().is(&base) {
            return Err(refuse(format!(
                "{module}.{qualname} derives from {}, the value is of type {}",
                base.name().map(|n| n.to_string()).unwrap_or_default(),
                value
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            )));
        }
        let fill = if base.is(py.get_type::<pyo3::types::PyList>())
            || base.is(py.get_type::<pyo3::types::PyByteArray>())
        {
            Some("extend")
        } else if base.is(py.get_type::<PyDict>()) || base.is(py.get_type::<pyo3::types::PySet>()) {
            Some("update")
        } else {
            None
        };
        let built = match fill {
            // Mutable bases: an empty instance, filled by the base type's own method.
            Some(method) => base.call_method1("__new__", (&cls,)).and_then(|obj| {
                base.getattr(method)?.call1((&obj, value))?;
                Ok(obj)
            }),
            None => base.call_method1("__new__", (&cls, value)),
        };
        built.map_err(py_refused(at))
    }

    fn ndarray(
        &mut self,
        tag: u8,
        at: usize,
        depth: usize,
    ) -> Result<Bound<'py, PyAny>, DecodeError> {
        let py = self.py;
        let descr = self.value(depth + 1)?;
        let ndim = self.r.len(1)?;
        let mut shape = Vec::with_capacity(ndim);
        let mut count: u64 = 1;
        for _ in 0..ndim {
            let d = self.r.varint()?;
            count = count.checked_mul(d).ok_or(DecodeError::Invalid {
                at,
                why: "array too large",
            })?;
            shape.push(d);
        }
        let fortran = match self.r.u8()? {
            0 => false,
            1 => true,
            _ => {
                return Err(DecodeError::Invalid {
                    at,
                    why: "bad array order",
                })
            }
        };
        let storage = self.r.u8()?;
        let (inline, shm) = match storage {
            wire::DATA_INLINE => {
                let n = self.r.len(1)?;
                (Some(self.r.take(n)?), None)
            }
            wire::DATA_SHM => (None, Some(ShmRef::read(&mut self.r)?)),
            _ => {
                return Err(DecodeError::Invalid {
                    at,
                    why: "bad array storage",
                })
            }
        };
        let np_err = py_refused(at);
        let dtype = refs::descr_to_dtype(py)
            .and_then(|f| f.call1((descr,)))
            .map_err(&np_err)?;
        // An object dtype would make numpy read pointers out of the payload.
        if dtype
            .getattr("hasobject")
            .and_then(|h| h.is_truthy())
            .map_err(&np_err)?
        {
            return Err(DecodeError::Invalid {
                at,
                why: "numpy arrays of Python objects are not accepted",
            });
        }
        let itemsize: u64 = dtype
            .getattr("itemsize")
            .and_then(|i| i.extract())
            .map_err(&np_err)?;
        let nbytes = count.checked_mul(itemsize).ok_or(DecodeError::Invalid {
            at,
            why: "array too large",
        })?;
        let data_len = match (&inline, &shm) {
            (Some(b), _) => b.len() as u64,
            (_, Some(s)) => s.len,
            _ => unreachable!(),
        };
        if data_len != nbytes {
            return Err(DecodeError::Invalid {
                at,
                why: "array data does not match its shape and dtype",
            });
        }
        let np = py.import("numpy").map_err(&np_err)?;
        let order = if fortran { "F" } else { "C" };
        let shape_t = PyTuple::new(py, &shape).map_err(&np_err)?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("order", order).map_err(&np_err)?;
        let arr = if nbytes == 0 {
            kwargs.set_item("dtype", &dtype).map_err(&np_err)?;
            np.call_method("empty", (shape_t,), Some(&kwargs))
                .map_err(&np_err)?
        } else {
            let flat = match (inline, shm) {
                (Some(b), _) => {
                    // One copy into a writable buffer the array then owns.
                    // SAFETY: b is a valid slice; the GIL is held.
                    let ba = owned(
                        py,
                        unsafe {
                            ffi::PyByteArray_FromStringAndSize(
                                b.as_ptr() as *const c_char,
                                b.len() as ffi::Py_ssize_t,
                            )
                        },
                        at,
                    )?;
                    np.call_method1("frombuffer", (ba, &dtype))
                        .map_err(&np_err)?
                }
                (_, Some(s)) if !self.may_view(&s, at)? => {
                    // A segment its sender could still change: a copy.
                    let (fd, _) = self.segment(&s, at, false)?;
                    let n = usize::try_from(s.len).map_err(|_| DecodeError::Truncated { at })?;
                    // SAFETY: a new bytearray of n bytes, filled before anything reads it.
                    let ba = owned(
                        py,
                        unsafe {
                            ffi::PyByteArray_FromStringAndSize(
                                std::ptr::null(),
                                n as ffi::Py_ssize_t,
                            )
                        },
                        at,
                    )?;
                    // SAFETY: ba is a live bytearray (its buffer is n bytes).
                    let addr = unsafe { ffi::PyByteArray_AsString(ba.as_ptr()) } as usize;
                    py.detach(|| {
                        // SAFETY: nobody else has the bytearray yet, and it outlives this call.
                        let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, n) };
                        shm::read_into(&fd, s.offset, dst)
                    })
                    .map_err(|e| DecodeError::Refused {
                        at,
                        why: format!("cannot read shared memory: {e}"),
                    })?;
                    let kw = PyDict::new(py);
                    kw.set_item("dtype", &dtype).map_err(&np_err)?;
                    kw.set_item("count", count).map_err(&np_err)?;
                    // Writable, like every received array (views write copy-on-write).
                    np.call_method("frombuffer", (ba,), Some(&kw))
                        .map_err(&np_err)?
                }
                (_, Some(s)) => {
                    let (fd, size) = self.segment(&s, at, false)?;
                    let view = ShmView::map(fd, size).map_err(|e| DecodeError::Refused {
                        at,
                        why: format!("cannot map shared memory: {e}"),
                    })?;
                    let view = Bound::new(py, view).map_err(&np_err)?;
                    let kw = PyDict::new(py);
                    kw.set_item("dtype", &dtype).map_err(&np_err)?;
                    kw.set_item("count", count).map_err(&np_err)?;
                    kw.set_item("offset", s.offset).map_err(&np_err)?;
                    np.call_method("frombuffer", (view,), Some(&kw))
                        .map_err(&np_err)?
                }
                _ => unreachable!(),
            };
            flat.call_method("reshape", (shape_t,), Some(&kwargs))
                .map_err(&np_err)?
        };
        if tag == wire::TAG_NPSCALAR {
            return arr.get_item(PyTuple::empty(py)).map_err(&np_err);
        }
        Ok(arr)
    }
}
