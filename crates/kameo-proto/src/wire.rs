//! The value encoding ("serde_py" v1): tags and bounds-checked primitives.
//!
//! Every value is a one-byte tag followed by its payload:
//!
//! | tag | type | payload |
//! |-----|------|---------|
//! | 0x00 | None | — |
//! | 0x01 | False | — |
//! | 0x02 | True | — |
//! | 0x03 | int fitting i64 | 8 bytes, little-endian two's complement |
//! | 0x04 | int beyond i64 | varint n, n bytes little-endian two's complement |
//! | 0x05 | float | 8 bytes, IEEE 754 binary64, little-endian |
//! | 0x06 | str | varint n, n bytes UTF-8 |
//! | 0x07 | bytes | varint n, n bytes |
//! | 0x08 | list | varint n, n values |
//! | 0x09 | tuple | varint n, n values |
//! | 0x0A | dict | varint n, n × (key value) in insertion order |
//! | 0x0B | complex | 2 × 8 bytes binary64 (real, imag) |
//! | 0x0C | set | varint n, n values |
//! | 0x0D | frozenset | varint n, n values |
//! | 0x0E | bytearray | varint n, n bytes |
//! | 0x0F | datetime.datetime | u16 year, u8 month, day, hour, minute, second, u32 µs, u8 fold, tz |
//! | 0x10 | datetime.date | u16 year, u8 month, u8 day |
//! | 0x11 | datetime.time | u8 hour, minute, second, u32 µs, u8 fold, tz |
//! | 0x12 | datetime.timedelta | i32 days, i32 seconds, i32 µs |
//! | 0x13 | decimal.Decimal | varint n, n bytes ASCII (`str(d)`) |
//! | 0x14 | uuid.UUID | 16 bytes, big-endian |
//! | 0x15 | enum member | class, value (the member's value) |
//! | 0x16 | dataclass instance | class, varint n, n × (str name, value) |
//! | 0x17 | NamedTuple instance | class, varint n, n values |
//! | 0x18 | numpy.ndarray | descr value, varint ndim, ndim × varint dim, u8 order (0 C, 1 F), data |
//! | 0x19 | numpy scalar | as 0x18, a 0-d array |
//! | 0x1A | pickled object | varint n, n bytes of pickle (refused unless allowed) |
//! | 0x1B | bytes-like in shared memory | u8 kind (0 bytes, 1 bytearray), shm-ref |
//! | 0x1C | instance of a registered subclass of a built-in | class, the value as its base type |
//! | 0x1D | shared list or dict (first occurrence) | the list or dict; it gets the next shared index |
//! | 0x1E | reference to a shared value | varint index (counted in the order 0x1D values end) |
//!
//! ```text
//! tz      = 0 (naive) | 1 (UTC) | 2 offset:i64 µs  named:u8 [varint n, name UTF-8]
//!         | 3 varint n, zoneinfo key UTF-8
//! class   = varint n, module UTF-8, varint n, qualname UTF-8
//! data    = 0 varint n, n bytes  |  1 shm-ref
//! shm-ref = varint fd index (into the frame's descriptors), varint offset, varint len
//! descr   = a str or a list value: numpy.lib.format.dtype_to_descr(dtype)
//! ```
//!
//! All fixed-width integers are little-endian.
//!
//! Varints are unsigned LEB128, at most 10 bytes. Decoders refuse nesting deeper than
//! [`MAX_DEPTH`] and any length that overruns the input.

use std::fmt;

pub const TAG_NONE: u8 = 0x00;
pub const TAG_FALSE: u8 = 0x01;
pub const TAG_TRUE: u8 = 0x02;
pub const TAG_INT: u8 = 0x03;
pub const TAG_BIGINT: u8 = 0x04;
pub const TAG_FLOAT: u8 = 0x05;
pub const TAG_STR: u8 = 0x06;
pub const TAG_BYTES: u8 = 0x07;
pub const TAG_LIST: u8 = 0x08;
pub const TAG_TUPLE: u8 = 0x09;
pub const TAG_DICT: u8 = 0x0A;
pub const TAG_COMPLEX: u8 = 0x0B;
pub const TAG_SET: u8 = 0x0C;
pub const TAG_FROZENSET: u8 = 0x0D;
pub const TAG_BYTEARRAY: u8 = 0x0E;
pub const TAG_DATETIME: u8 = 0x0F;
pub const TAG_DATE: u8 = 0x10;
pub const TAG_TIME: u8 = 0x11;
pub const TAG_TIMEDELTA: u8 = 0x12;
pub const TAG_DECIMAL: u8 = 0x13;
pub const TAG_UUID: u8 = 0x14;
pub const TAG_ENUM: u8 = 0x15;
pub const TAG_DATACLASS: u8 = 0x16;
pub const TAG_NAMEDTUPLE: u8 = 0x17;
pub const TAG_NDARRAY: u8 = 0x18;
pub const TAG_NPSCALAR: u8 = 0x19;
pub const TAG_PICKLE: u8 = 0x1A;
pub const TAG_SHM_BYTES: u8 = 0x1B;
/// An instance of a subclass of a built-in type registered with `kameo.register_type`: the
/// class, then the value as its built-in base.
pub const TAG_SUBCLASS: u8 = 0x1C;
/// A value the message holds more than once (a list or dict two containers share): this
/// first occurrence is followed by the value, which gets the next index of the shared table
/// when it is complete.
pub const TAG_SHARED: u8 = 0x1D;
/// Another occurrence of a shared value: a varint index into the shared table. Only a value
/// already complete can be referred to, so references never form a cycle.
pub const TAG_REF: u8 = 0x1E;
/// A reference to a remote object living in a worker: varint worker id (a `u32`), varint object
/// number, then its type name as a varint-prefixed str. Only CALL bodies (parent → worker) and
/// a worker's answers carry them; each side resolves them with its own hook.
pub const TAG_REMOTE: u8 = 0x1F;

/// `tz` kinds of datetime and time values.
pub const TZ_NAIVE: u8 = 0;
pub const TZ_UTC: u8 = 1;
pub const TZ_FIXED: u8 = 2;
pub const TZ_ZONE: u8 = 3;

/// `data` storage of ndarray payloads.
pub const DATA_INLINE: u8 = 0;
pub const DATA_SHM: u8 = 1;

/// Bytes of the fixed part of temporal payloads (before any tz).
pub const DATETIME_FIXED: usize = 2 + 5 + 4 + 1;
pub const DATE_FIXED: usize = 4;
pub const TIME_FIXED: usize = 3 + 4 + 1;
pub const TIMEDELTA_FIXED: usize = 12;

/// Deepest nesting of containers accepted by encoders and decoders.
pub const MAX_DEPTH: usize = 512;

/// Why a buffer could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Input ended inside a value that started at `at`.
    Truncated { at: usize },
    /// A tag this version does not know.
    UnknownTag { tag: u8, at: usize },
    /// A varint longer than 10 bytes or over `u64`.
    BadVarint { at: usize },
    /// Containers nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A str payload that is not UTF-8.
    BadUtf8 { at: usize },
    /// Bytes left over after the top-level value.
    TrailingBytes { at: usize },
    /// A value that is well-formed but not acceptable (e.g. an unhashable dict key).
    Invalid { at: usize, why: &'static str },
    /// As `Invalid`, with a message built at run time (e.g. naming a class).
    Refused { at: usize, why: String },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { at } => write!(f, "truncated value at byte {at}"),
            DecodeError::UnknownTag { tag, at } => {
                write!(f, "unknown value tag {tag:#04x} at byte {at}")
            }
            DecodeError::BadVarint { at } => write!(f, "malformed length at byte {at}"),
            DecodeError::TooDeep => write!(f, "value nested deeper than {MAX_DEPTH} levels"),
            DecodeError::BadUtf8 { at } => write!(f, "invalid UTF-8 in str at byte {at}"),
            DecodeError::TrailingBytes { at } => {
                write!(f, "unexpected bytes after the value at byte {at}")
            }
            DecodeError::Invalid { at, why } => write!(f, "invalid value at byte {at}: {why}"),
            DecodeError::Refused { at, why } => write!(f, "value at byte {at} refused: {why}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Append a varint.
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked cursor over an encoded buffer.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// How many shared values (TAG_SHARED) are complete: the valid TAG_REF indices.
    shared: u64,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            shared: 0,
        }
    }

    /// A reader over `buf` from `pos`, with `shared` shared values (TAG_SHARED) already
    /// complete: to read a shared value's bytes again where a TAG_REF refers to it, with the
    /// references inside it valid as they were the first time.
    pub fn resume(buf: &'a [u8], pos: usize, shared: u64) -> Self {
        Reader {
            buf,
            pos: pos.min(buf.len()),
            shared,
        }
    }

    #[inline]
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// How many shared values (TAG_SHARED) are complete so far.
    #[inline]
    pub fn shared_count(&self) -> u64 {
        self.shared
    }

    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The input not consumed yet.
    #[inline]
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// The next byte, without consuming it.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(DecodeError::Truncated { at: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Truncated { at: self.pos })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated { at: self.pos })?;
        self.pos = end;
        Ok(s)
    }

    #[inline]
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    #[inline]
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    #[inline]
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }

    /// A varint-prefixed UTF-8 string.
    #[inline]
    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let n = self.len(1)?;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::BadUtf8 { at })
    }

    #[inline]
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    #[inline]
    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    #[inline]
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        // One byte (below 128) is by far the most common length.
        match self.buf.get(self.pos) {
            Some(&b) if b < 0x80 => {
                self.pos += 1;
                Ok(u64::from(b))
            }
            _ => self.varint_long(),
        }
    }

    #[inline(never)]
    fn varint_long(&mut self) -> Result<u64, DecodeError> {
        let at = self.pos;
        let mut v: u64 = 0;
        for shift in (0..70).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(DecodeError::BadVarint { at });
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadVarint { at })
    }

    /// A length that must fit in the remaining input, counting each element as at least
    /// `min_each` bytes: a hostile count cannot make the decoder pre-allocate more than the
    /// input could hold.
    #[inline]
    pub fn len(&mut self, min_each: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated { at })?;
        if n.checked_mul(min_each)
            .is_none_or(|need| need > self.remaining())
        {
            return Err(DecodeError::Truncated { at });
        }
        Ok(n)
    }

    /// After TAG_SHARED: check that a list or dict follows (nothing else is shared, and a
    /// marker cannot wrap another).
    #[inline]
    pub fn shared_start(&self) -> Result<(), DecodeError> {
        match self.buf.get(self.pos) {
            Some(&(TAG_LIST | TAG_DICT)) => Ok(()),
            Some(_) => Err(DecodeError::Invalid {
                at: self.pos,
                why: "a shared value must be a list or a dict",
            }),
            None => Err(DecodeError::Truncated { at: self.pos }),
        }
    }

    /// A shared value (TAG_SHARED) is complete: it takes the next index.
    #[inline]
    pub fn shared_done(&mut self) {
        self.shared += 1;
    }

    /// The index of a TAG_REF, checked against the shared values complete so far.
    pub fn shared_ref(&mut self) -> Result<u64, DecodeError> {
        let at = self.pos;
        let i = self.varint()?;
        if i >= self.shared {
            return Err(DecodeError::Invalid {
                at,
                why: "reference to a shared value that is not complete",
            });
        }
        Ok(i)
    }

    /// The payload of a TAG_REMOTE: (worker id, object number, type name).
    pub fn remote(&mut self) -> Result<(u32, u64, &'a str), DecodeError> {
        let at = self.pos;
        let worker = u32::try_from(self.varint()?).map_err(|_| DecodeError::Invalid {
            at,
            why: "remote object worker id over u32",
        })?;
        let number = self.varint()?;
        Ok((worker, number, self.str()?))
    }

    /// Fail unless the whole input was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { at: self.pos })
        }
    }
}

/// A decoded value, for validation and tests (the Python extension decodes straight into
/// Python objects with the same [`Reader`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// Little-endian two's complement bytes of an int beyond i64.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Complex(f64, f64),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    ByteArray(Vec<u8>),
    /// datetime, date, time or timedelta: the tag, the fixed-width part, and the tz of
    /// datetime and time values.
    Temporal {
        tag: u8,
        fixed: Vec<u8>,
        tz: Option<Tz>,
    },
    Decimal(String),
    Uuid([u8; 16]),
    /// An enum member (one unnamed field), a dataclass (named fields) or a NamedTuple.
    Object {
        tag: u8,
        class: (String, String),
        fields: Vec<(Option<String>, Value)>,
    },
    /// An instance of a registered subclass of a built-in type (TAG_SUBCLASS): its class and
    /// its value as the base type (see [`Value::is_builtin_base`]).
    Subclass {
        class: (String, String),
        value: Box<Value>,
    },
    /// A numpy array or scalar (TAG_NDARRAY / TAG_NPSCALAR).
    Array {
        tag: u8,
        descr: Box<Value>,
        shape: Vec<u64>,
        fortran: bool,
        data: Data,
    },
    Pickle(Vec<u8>),
    ShmBytes {
        bytearray: bool,
        shm: ShmRef,
    },
    /// The first occurrence of a value the message holds more than once (TAG_SHARED).
    Shared(Box<Value>),
    /// Another occurrence: an index into the shared values, in the order they ended (TAG_REF).
    /// Kept as a reference, not copied: a chain of references can stand for a tree far larger
    /// than the input.
    Ref(u64),
    /// A remote object reference (TAG_REMOTE).
    Remote {
        worker: u32,
        number: u64,
        type_name: String,
    },
}

/// The tzinfo of a datetime or time.
#[derive(Debug, Clone, PartialEq)]
pub enum Tz {
    Naive,
    Utc,
    Fixed {
        offset_us: i64,
        name: Option<String>,
    },
    Zone(String),
}

/// Where the bytes of an array live.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Inline(Vec<u8>),
    Shm(ShmRef),
}

/// A byte range of one of the descriptors sent with the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRef {
    pub fd: u64,
    pub offset: u64,
    pub len: u64,
}

impl ShmRef {
    pub fn read(r: &mut Reader<'_>) -> Result<ShmRef, DecodeError> {
        Ok(ShmRef {
            fd: r.varint()?,
            offset: r.varint()?,
            len: r.varint()?,
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        put_varint(out, self.fd);
        put_varint(out, self.offset);
        put_varint(out, self.len);
    }
}

impl Tz {
    pub fn read(r: &mut Reader<'_>) -> Result<Tz, DecodeError> {
        let at = r.pos();
        Ok(match r.u8()? {
            TZ_NAIVE => Tz::Naive,
            TZ_UTC => Tz::Utc,
            TZ_FIXED => {
                let offset_us = r.i64()?;
                let name = match r.u8()? {
                    0 => None,
                    1 => Some(r.str()?.to_owned()),
                    _ => {
                        return Err(DecodeError::Invalid {
                            at,
                            why: "bad tz name flag",
                        })
                    }
                };
                Tz::Fixed { offset_us, name }
            }
            TZ_ZONE => Tz::Zone(r.str()?.to_owned()),
            _ => {
                return Err(DecodeError::Invalid {
                    at,
                    why: "unknown tz kind",
                })
            }
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Tz::Naive => out.push(TZ_NAIVE),
            Tz::Utc => out.push(TZ_UTC),
            Tz::Fixed { offset_us, name } => {
                out.push(TZ_FIXED);
                out.extend_from_slice(&offset_us.to_le_bytes());
                match name {
                    None => out.push(0),
                    Some(n) => {
                        out.push(1);
                        put_str(out, n);
                    }
                }
            }
            Tz::Zone(k) => {
                out.push(TZ_ZONE);
                put_str(out, k);
            }
        }
    }
}

/// Append `tag`, then `b` with its varint length.
fn put_blob(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
    out.push(tag);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Append `tag`, the item count, then each item.
fn put_seq(out: &mut Vec<u8>, tag: u8, items: &[Value]) {
    out.push(tag);
    put_varint(out, items.len() as u64);
    for v in items {
        v.encode(out);
    }
}

/// Append a varint-prefixed UTF-8 string (no tag).
#[inline]
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Append an int as Python's encoder writes it: TAG_INT when it fits i64, else TAG_BIGINT with
/// `bit_length(|v|) / 8 + 1` bytes of little-endian two's complement.
pub fn put_i128(out: &mut Vec<u8>, v: i128) {
    if let Ok(small) = i64::try_from(v) {
        out.push(TAG_INT);
        out.extend_from_slice(&small.to_le_bytes());
        return;
    }
    let bits = 128 - v.unsigned_abs().leading_zeros() as usize;
    put_bigint_bytes(out, &v.to_le_bytes(), bits / 8 + 1, v < 0);
}

/// As [`put_i128`], for an unsigned value (up to `u128::MAX`, 17 bytes).
pub fn put_u128(out: &mut Vec<u8>, v: u128) {
    if let Ok(small) = i128::try_from(v) {
        return put_i128(out, small);
    }
    // Over i128::MAX: 128 bits, so 17 bytes, the last one 0 (the sign).
    put_bigint_bytes(out, &v.to_le_bytes(), 17, false);
}

/// TAG_BIGINT, then the first `n` bytes of the sign-extended little-endian `le`.
fn put_bigint_bytes(out: &mut Vec<u8>, le: &[u8; 16], n: usize, negative: bool) {
    out.push(TAG_BIGINT);
    put_varint(out, n as u64);
    let fill = if negative { 0xff } else { 0 };
    out.extend((0..n).map(|i| le.get(i).copied().unwrap_or(fill)));
}

/// The bytes of a TAG_BIGINT payload without the redundant sign bytes at the top: at most the
/// bytes a value needs (an empty payload is 0, as for Python's `int.from_bytes`).
fn bigint_trimmed(mut b: &[u8]) -> &[u8] {
    while let [rest @ .., prev, last] = b {
        let redundant = (*last == 0 && *prev & 0x80 == 0) || (*last == 0xff && *prev & 0x80 != 0);
        if !redundant {
            break;
        }
        b = &b[..rest.len() + 1];
    }
    b
}

/// A TAG_BIGINT payload (little-endian two's complement, any length) as an i128, if it fits.
pub fn bigint_to_i128(b: &[u8]) -> Option<i128> {
    let b = bigint_trimmed(b);
    if b.len() > 16 {
        return None;
    }
    let negative = b.last().is_some_and(|l| l & 0x80 != 0);
    let mut le = [if negative { 0xff } else { 0 }; 16];
    le[..b.len()].copy_from_slice(b);
    Some(i128::from_le_bytes(le))
}

/// A TAG_BIGINT payload as a u128, if it is not negative and fits.
pub fn bigint_to_u128(b: &[u8]) -> Option<u128> {
    let b = bigint_trimmed(b);
    if b.last().is_some_and(|l| l & 0x80 != 0) {
        return None;
    }
    // A positive value over i128::MAX has a 17th byte, 0.
    let b = match b {
        [head @ .., 0] if b.len() == 17 => head,
        _ => b,
    };
    if b.len() > 16 {
        return None;
    }
    let mut le = [0; 16];
    le[..b.len()].copy_from_slice(b);
    Some(u128::from_le_bytes(le))
}

/// What [`skip`] met inside the value it stepped over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// A TAG_REF: the value's bytes alone do not stand for it.
    pub refs: bool,
    /// A shared-memory reference (TAG_SHM_BYTES or an array's DATA_SHM).
    pub shm: bool,
}

/// Step over one value at the reader's position without building it, inside `depth` levels
/// of containers, checking its structure (tags, lengths, nesting, shared references) but not
/// what only a full decode checks (UTF-8, hashable keys). `on_shared(start, end)` is called
/// with the byte range of each shared value's list or dict as it completes, in the order of
/// the shared table.
pub fn skip(
    r: &mut Reader<'_>,
    depth: usize,
    on_shared: &mut dyn FnMut(usize, usize),
) -> Result<Skipped, DecodeError> {
    // Iterative (a stack of open containers), so that deep nesting costs no call stack.
    #[derive(PartialEq)]
    enum Kind {
        Plain,
        /// Dataclass fields: a str name before each value.
        Named,
        /// An array: its shape, order and data follow its descr.
        ArrayTail,
    }
    struct Open {
        left: usize,
        kind: Kind,
        shared: Option<usize>,
    }
    let mut seen = Skipped::default();
    let mut stack: Vec<Open> = Vec::new();
    'value: loop {
        let at = r.pos();
        let mut shared = None;
        let mut tag = r.u8()?;
        if tag == TAG_SHARED {
            r.shared_start()?;
            shared = Some(r.pos());
            tag = r.u8()?;
        }
        let level = depth + stack.len();
        let mut open = |left: usize, kind: Kind| {
            if level >= MAX_DEPTH {
                return Err(DecodeError::TooDeep);
            }
            stack.push(Open { left, kind, shared });
            Ok(())
        };
        match tag {
            TAG_NONE | TAG_FALSE | TAG_TRUE => {}
            TAG_INT | TAG_FLOAT => {
                r.take(8)?;
            }
            TAG_COMPLEX | TAG_UUID => {
                r.take(16)?;
            }
            TAG_BIGINT | TAG_STR | TAG_BYTES | TAG_BYTEARRAY | TAG_DECIMAL | TAG_PICKLE => {
                let n = r.len(1)?;
                r.take(n)?;
            }
            TAG_LIST | TAG_TUPLE | TAG_SET | TAG_FROZENSET => open(r.len(1)?, Kind::Plain)?,
            // len(2) is at most the input's length: twice it cannot overflow.
            TAG_DICT => open(r.len(2)? * 2, Kind::Plain)?,
            TAG_DATETIME | TAG_DATE | TAG_TIME | TAG_TIMEDELTA => {
                r.take(match tag {
                    TAG_DATETIME => DATETIME_FIXED,
                    TAG_DATE => DATE_FIXED,
                    TAG_TIME => TIME_FIXED,
                    _ => TIMEDELTA_FIXED,
                })?;
                if matches!(tag, TAG_DATETIME | TAG_TIME) {
                    Tz::read(r)?;
                }
            }
            TAG_ENUM | TAG_SUBCLASS | TAG_DATACLASS | TAG_NAMEDTUPLE => {
                r.str()?;
                r.str()?;
                match tag {
                    TAG_DATACLASS => open(r.len(1)?, Kind::Named)?,
                    TAG_NAMEDTUPLE => open(r.len(1)?, Kind::Plain)?,
                    _ => open(1, Kind::Plain)?,
                }
            }
            TAG_NDARRAY | TAG_NPSCALAR => open(1, Kind::ArrayTail)?,
            TAG_SHM_BYTES => {
                if r.u8()? > 1 {
                    return Err(DecodeError::Invalid {
                        at,
                        why: "bad shared bytes kind",
                    });
                }
                ShmRef::read(r)?;
                seen.shm = true;
            }
            TAG_REF => {
                r.shared_ref()?;
                seen.refs = true;
            }
            TAG_REMOTE => {
                r.remote()?;
            }
            tag => return Err(DecodeError::UnknownTag { tag, at }),
        }
        // The next value to read, or the end of the containers it completes.
        loop {
            let Some(top) = stack.last_mut() else {
                return Ok(seen);
            };
            if top.left > 0 {
                top.left -= 1;
                if top.kind == Kind::Named {
                    r.str()?;
                }
                continue 'value;
            }
            let done = stack.pop().expect("an open container");
            if done.kind == Kind::ArrayTail {
                skip_array_tail(r, &mut seen)?;
            }
            if let Some(start) = done.shared {
                r.shared_done();
                on_shared(start, r.pos());
            }
        }
    }
}

/// An array's shape, order and data (after its descr).
fn skip_array_tail(r: &mut Reader<'_>, seen: &mut Skipped) -> Result<(), DecodeError> {
    let at = r.pos();
    for _ in 0..r.len(1)? {
        r.varint()?;
    }
    if r.u8()? > 1 {
        return Err(DecodeError::Invalid {
            at,
            why: "bad array order",
        });
    }
    match r.u8()? {
        DATA_INLINE => {
            let n = r.len(1)?;
            r.take(n)?;
        }
        DATA_SHM => {
            ShmRef::read(r)?;
            seen.shm = true;
        }
        _ => {
            return Err(DecodeError::Invalid {
                at,
                why: "bad array storage",
            })
        }
    }
    Ok(())
}

impl Value {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::None => out.push(TAG_NONE),
            Value::Bool(false) => out.push(TAG_FALSE),
            Value::Bool(true) => out.push(TAG_TRUE),
            Value::Int(i) => {
                out.push(TAG_INT);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Value::BigInt(b) => put_blob(out, TAG_BIGINT, b),
            Value::Float(f) => {
                out.push(TAG_FLOAT);
                out.extend_from_slice(&f.to_le_bytes());
            }
            Value::Str(s) => put_blob(out, TAG_STR, s.as_bytes()),
            Value::Bytes(b) => put_blob(out, TAG_BYTES, b),
            Value::List(items) => put_seq(out, TAG_LIST, items),
            Value::Tuple(items) => put_seq(out, TAG_TUPLE, items),
            Value::Dict(items) => {
                out.push(TAG_DICT);
                put_varint(out, items.len() as u64);
                for (k, v) in items {
                    k.encode(out);
                    v.encode(out);
                }
            }
            Value::Complex(re, im) => {
                out.push(TAG_COMPLEX);
                out.extend_from_slice(&re.to_le_bytes());
                out.extend_from_slice(&im.to_le_bytes());
            }
            Value::Set(items) => put_seq(out, TAG_SET, items),
            Value::FrozenSet(items) => put_seq(out, TAG_FROZENSET, items),
            Value::ByteArray(b) => put_blob(out, TAG_BYTEARRAY, b),
            Value::Temporal { tag, fixed, tz } => {
                out.push(*tag);
                out.extend_from_slice(fixed);
                if let Some(tz) = tz {
                    tz.write(out);
                }
            }
            Value::Decimal(d) => {
                out.push(TAG_DECIMAL);
                put_str(out, d);
            }
            Value::Uuid(b) => {
                out.push(TAG_UUID);
                out.extend_from_slice(b);
            }
            Value::Object { tag, class, fields } => {
                out.push(*tag);
                put_str(out, &class.0);
                put_str(out, &class.1);
                if *tag != TAG_ENUM {
                    put_varint(out, fields.len() as u64);
                }
                for (name, v) in fields {
                    if let Some(name) = name {
                        put_str(out, name);
                    }
                    v.encode(out);
                }
            }
            Value::Subclass { class, value } => {
                out.push(TAG_SUBCLASS);
                put_str(out, &class.0);
                put_str(out, &class.1);
                value.encode(out);
            }
            Value::Array {
                tag,
                descr,
                shape,
                fortran,
                data,
            } => {
                out.push(*tag);
                descr.encode(out);
                put_varint(out, shape.len() as u64);
                for d in shape {
                    put_varint(out, *d);
                }
                out.push(u8::from(*fortran));
                match data {
                    Data::Inline(b) => {
                        out.push(DATA_INLINE);
                        put_varint(out, b.len() as u64);
                        out.extend_from_slice(b);
                    }
                    Data::Shm(r) => {
                        out.push(DATA_SHM);
                        r.write(out);
                    }
                }
            }
            Value::Pickle(b) => put_blob(out, TAG_PICKLE, b),
            Value::ShmBytes { bytearray, shm } => {
                out.push(TAG_SHM_BYTES);
                out.push(u8::from(*bytearray));
                shm.write(out);
            }
            Value::Shared(v) => {
                out.push(TAG_SHARED);
                v.encode(out);
            }
            Value::Ref(i) => {
                out.push(TAG_REF);
                put_varint(out, *i);
            }
            Value::Remote {
                worker,
                number,
                type_name,
            } => {
                out.push(TAG_REMOTE);
                put_varint(out, u64::from(*worker));
                put_varint(out, *number);
                put_str(out, type_name);
            }
        }
    }

    /// Decode exactly one value spanning all of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Value, DecodeError> {
        let mut r = Reader::new(buf);
        let v = Value::read(&mut r, 0)?;
        r.finish()?;
        Ok(v)
    }

    /// Decode one value at the reader's position, inside `depth` levels of containers (0 at
    /// the top); the reader's shared values count on (see [`Reader::resume`]).
    pub fn read(r: &mut Reader<'_>, depth: usize) -> Result<Value, DecodeError> {
        let at = r.pos();
        Ok(match r.u8()? {
            TAG_NONE => Value::None,
            TAG_FALSE => Value::Bool(false),
            TAG_TRUE => Value::Bool(true),
            TAG_INT => Value::Int(r.i64()?),
            TAG_BIGINT => {
                let n = r.len(1)?;
                Value::BigInt(r.take(n)?.to_vec())
            }
            TAG_FLOAT => Value::Float(r.f64()?),
            TAG_STR => {
                let n = r.len(1)?;
                let s = std::str::from_utf8(r.take(n)?).map_err(|_| DecodeError::BadUtf8 { at })?;
                Value::Str(s.to_owned())
            }
            TAG_BYTES => {
                let n = r.len(1)?;
                Value::Bytes(r.take(n)?.to_vec())
            }
            tag @ (TAG_LIST | TAG_TUPLE | TAG_DICT) => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                if tag == TAG_DICT {
                    let n = r.len(2)?;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        let k = Value::read(r, depth + 1)?;
                        if !k.hashable() {
                            return Err(DecodeError::Invalid {
                                at,
                                why: "unhashable dict key",
                            });
                        }
                        items.push((k, Value::read(r, depth + 1)?));
                    }
                    Value::Dict(items)
                } else {
                    let n = r.len(1)?;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(Value::read(r, depth + 1)?);
                    }
                    if tag == TAG_LIST {
                        Value::List(items)
                    } else {
                        Value::Tuple(items)
                    }
                }
            }
            tag => Value::read_ext(r, tag, at, depth)?,
        })
    }

    /// The tags beyond the JSON-like core, kept out of [`Value::read`] so that its stack frame
    /// stays small for deep nesting.
    #[inline(never)]
    fn read_ext(
        r: &mut Reader<'_>,
        tag: u8,
        at: usize,
        depth: usize,
    ) -> Result<Value, DecodeError> {
        Ok(match tag {
            TAG_COMPLEX => Value::Complex(r.f64()?, r.f64()?),
            tag @ (TAG_SET | TAG_FROZENSET) => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let n = r.len(1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let v = Value::read(r, depth + 1)?;
                    if !v.hashable() {
                        return Err(DecodeError::Invalid {
                            at,
                            why: "unhashable set member",
                        });
                    }
                    items.push(v);
                }
                if tag == TAG_SET {
                    Value::Set(items)
                } else {
                    Value::FrozenSet(items)
                }
            }
            TAG_BYTEARRAY => {
                let n = r.len(1)?;
                Value::ByteArray(r.take(n)?.to_vec())
            }
            tag @ (TAG_DATETIME | TAG_DATE | TAG_TIME | TAG_TIMEDELTA) => {
                let n = match tag {
                    TAG_DATETIME => DATETIME_FIXED,
                    TAG_DATE => DATE_FIXED,
                    TAG_TIME => TIME_FIXED,
                    _ => TIMEDELTA_FIXED,
                };
                let fixed = r.take(n)?.to_vec();
                let tz = if matches!(tag, TAG_DATETIME | TAG_TIME) {
                    Some(Tz::read(r)?)
                } else {
                    None
                };
                Value::Temporal { tag, fixed, tz }
            }
            TAG_DECIMAL => Value::Decimal(r.str()?.to_owned()),
            TAG_UUID => Value::Uuid(r.take(16)?.try_into().expect("16 bytes")),
            tag @ (TAG_ENUM | TAG_DATACLASS | TAG_NAMEDTUPLE) => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let class = (r.str()?.to_owned(), r.str()?.to_owned());
                let mut fields = Vec::new();
                if tag == TAG_ENUM {
                    fields.push((None, Value::read(r, depth + 1)?));
                } else {
                    let n = r.len(1)?;
                    for _ in 0..n {
                        let name = if tag == TAG_DATACLASS {
                            Some(r.str()?.to_owned())
                        } else {
                            None
                        };
                        fields.push((name, Value::read(r, depth + 1)?));
                    }
                }
                Value::Object { tag, class, fields }
            }
            TAG_SUBCLASS => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let class = (r.str()?.to_owned(), r.str()?.to_owned());
                let value = Value::read(r, depth + 1)?;
                if !value.is_builtin_base() {
                    return Err(DecodeError::Invalid {
                        at,
                        why: "a registered subclass must wrap a built-in value",
                    });
                }
                Value::Subclass {
                    class,
                    value: Box::new(value),
                }
            }
            tag @ (TAG_NDARRAY | TAG_NPSCALAR) => {
                if depth >= MAX_DEPTH {
                    return Err(DecodeError::TooDeep);
                }
                let descr = Box::new(Value::read(r, depth + 1)?);
                let ndim = r.len(1)?;
                let mut shape = Vec::with_capacity(ndim);
                for _ in 0..ndim {
                    shape.push(r.varint()?);
                }
                let fortran = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(DecodeError::Invalid {
                            at,
                            why: "bad array order",
                        })
                    }
                };
                let data = match r.u8()? {
                    DATA_INLINE => {
                        let n = r.len(1)?;
                        Data::Inline(r.take(n)?.to_vec())
                    }
                    DATA_SHM => Data::Shm(ShmRef::read(r)?),
                    _ => {
                        return Err(DecodeError::Invalid {
                            at,
                            why: "bad array storage",
                        })
                    }
                };
                Value::Array {
                    tag,
                    descr,
                    shape,
                    fortran,
                    data,
                }
            }
            TAG_PICKLE => {
                let n = r.len(1)?;
                Value::Pickle(r.take(n)?.to_vec())
            }
            TAG_SHM_BYTES => {
                let bytearray = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(DecodeError::Invalid {
                            at,
                            why: "bad shared bytes kind",
                        })
                    }
                };
                Value::ShmBytes {
                    bytearray,
                    shm: ShmRef::read(r)?,
                }
            }
            TAG_SHARED => {
                r.shared_start()?;
                let v = Value::read(r, depth)?;
                r.shared_done();
                Value::Shared(Box::new(v))
            }
            TAG_REF => Value::Ref(r.shared_ref()?),
            TAG_REMOTE => {
                let (worker, number, type_name) = r.remote()?;
                Value::Remote {
                    worker,
                    number,
                    type_name: type_name.to_owned(),
                }
            }
            tag => return Err(DecodeError::UnknownTag { tag, at }),
        })
    }

    /// Whether the value is of a built-in type that `kameo.register_type` accepts subclasses
    /// of: str, int, float, complex, bytes, bytearray, list, tuple, dict, set, frozenset.
    pub fn is_builtin_base(&self) -> bool {
        matches!(
            self,
            Value::Int(_)
                | Value::BigInt(_)
                | Value::Float(_)
                | Value::Str(_)
                | Value::Bytes(_)
                | Value::ByteArray(_)
                | Value::ShmBytes { .. }
                | Value::Complex(..)
                | Value::List(_)
                | Value::Tuple(_)
                | Value::Dict(_)
                | Value::Set(_)
                | Value::FrozenSet(_)
        )
    }

    /// Whether Python could hash the decoded value (containers of mutable types cannot; a
    /// registered subclass may define its own hash, so it is given the benefit of the doubt).
    fn hashable(&self) -> bool {
        match self {
            Value::List(_)
            | Value::Dict(_)
            | Value::Set(_)
            | Value::ByteArray(_)
            | Value::Array {
                tag: TAG_NDARRAY, ..
            } => false,
            Value::ShmBytes { bytearray, .. } => !bytearray,
            Value::Shared(v) => v.hashable(),
            // Only lists and dicts are shared.
            Value::Ref(_) => false,
            Value::Tuple(items) | Value::FrozenSet(items) => items.iter().all(Value::hashable),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::None),
            (any::<u32>(), any::<u64>(), "[A-Za-z_.]{0,12}").prop_map(|(w, n, t)| {
                Value::Remote {
                    worker: w,
                    number: n,
                    type_name: t,
                }
            }),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 9..20).prop_map(Value::BigInt),
            any::<f64>()
                .prop_filter("nan != nan", |f| !f.is_nan())
                .prop_map(Value::Float),
            ".*".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::ByteArray),
            (-1e9f64..1e9, -1e9f64..1e9).prop_map(|(a, b)| Value::Complex(a, b)),
            "-?[0-9]{1,30}(\\.[0-9]{1,10})?".prop_map(Value::Decimal),
            any::<[u8; 16]>().prop_map(Value::Uuid),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Pickle),
            (any::<bool>(), any::<(u64, u64, u64)>()).prop_map(|(b, (fd, offset, len))| {
                Value::ShmBytes {
                    bytearray: b,
                    shm: ShmRef { fd, offset, len },
                }
            }),
            (
                proptest::collection::vec(any::<u8>(), DATETIME_FIXED),
                arb_tz()
            )
                .prop_map(|(fixed, tz)| Value::Temporal {
                    tag: TAG_DATETIME,
                    fixed,
                    tz: Some(tz)
                }),
            proptest::collection::vec(any::<u8>(), TIMEDELTA_FIXED).prop_map(|fixed| {
                Value::Temporal {
                    tag: TAG_TIMEDELTA,
                    fixed,
                    tz: None,
                }
            }),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Tuple),
                proptest::collection::vec((any::<i64>().prop_map(Value::Int), inner.clone()), 0..8)
                    .prop_map(Value::Dict),
                proptest::collection::vec(any::<i64>().prop_map(Value::Int), 0..8)
                    .prop_map(Value::FrozenSet),
                (
                    "[a-z.]{1,10}",
                    "[A-Za-z.]{1,10}",
                    proptest::collection::vec(("[a-z_]{1,8}", inner.clone()), 0..4)
                )
                    .prop_map(|(m, q, f)| Value::Object {
                        tag: TAG_DATACLASS,
                        class: (m, q),
                        fields: f.into_iter().map(|(n, v)| (Some(n), v)).collect(),
                    }),
                ("[a-z.]{1,10}", "[A-Za-z.]{1,10}", inner.clone()).prop_map(|(m, q, v)| {
                    Value::Object {
                        tag: TAG_ENUM,
                        class: (m, q),
                        fields: vec![(None, v)],
                    }
                }),
                (
                    "[a-z.]{1,10}",
                    "[A-Za-z.]{1,10}",
                    inner
                        .clone()
                        .prop_filter("a built-in base", Value::is_builtin_base)
                )
                    .prop_map(|(m, q, v)| Value::Subclass {
                        class: (m, q),
                        value: Box::new(v),
                    }),
                (
                    inner,
                    proptest::collection::vec(0u64..100, 0..4),
                    any::<bool>(),
                    proptest::collection::vec(any::<u8>(), 0..32)
                )
                    .prop_map(|(d, shape, fortran, data)| Value::Array {
                        tag: TAG_NDARRAY,
                        descr: Box::new(d),
                        shape,
                        fortran,
                        data: Data::Inline(data),
                    }),
            ]
        })
    }

    fn arb_tz() -> impl Strategy<Value = Tz> {
        prop_oneof![
            Just(Tz::Naive),
            Just(Tz::Utc),
            (any::<i64>(), proptest::option::of("[A-Z]{0,5}"))
                .prop_map(|(offset_us, name)| Tz::Fixed { offset_us, name }),
            "[A-Za-z/_]{1,20}".prop_map(Tz::Zone),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(v in arb_value()) {
            let mut b = Vec::new();
            v.encode(&mut b);
            prop_assert_eq!(Value::decode(&b).unwrap(), v);
        }

        #[test]
        fn truncation_is_an_error_never_a_panic(v in arb_value(), cut in any::<prop::sample::Index>()) {
            let mut b = Vec::new();
            v.encode(&mut b);
            let cut = cut.index(b.len());
            prop_assert!(Value::decode(&b[..cut]).is_err());
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Value::decode(&b);
            let _ = skip(&mut Reader::new(&b), 0, &mut |_, _| {});
        }

        #[test]
        fn skip_steps_over_what_read_decodes(v in arb_value(), extra in any::<u8>()) {
            let mut b = Vec::new();
            v.encode(&mut b);
            let end = b.len();
            b.push(extra);
            let mut r = Reader::new(&b);
            skip(&mut r, 0, &mut |_, _| {}).unwrap();
            prop_assert_eq!(r.pos(), end);
        }

        #[test]
        fn ints_round_trip_through_bigint(v in any::<i128>(), u in any::<u128>()) {
            for (b, want_i, want_u) in [
                ({ let mut b = Vec::new(); put_i128(&mut b, v); b }, Some(v), u128::try_from(v).ok()),
                ({ let mut b = Vec::new(); put_u128(&mut b, u); b }, i128::try_from(u).ok(), Some(u)),
            ] {
                let got = Value::decode(&b).unwrap();
                let (gi, gu) = match got {
                    Value::Int(i) => (Some(i128::from(i)), u128::try_from(i).ok()),
                    Value::BigInt(ref p) => (bigint_to_i128(p), bigint_to_u128(p)),
                    _ => unreachable!(),
                };
                prop_assert_eq!(gi, want_i);
                prop_assert_eq!(gu, want_u);
            }
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn bigints_as_python_writes_them() {
        // `kameo._native.encode(v).hex()` for each.
        let cases: [(i128, &str); 7] = [
            (1 << 63, "0409000000000000008000"),
            (1 << 64, "0409000000000000000001"),
            (-(1 << 63) - 1, "0409ffffffffffffff7fff"),
            (-(1 << 64), "04090000000000000000ff"),
            (-(1 << 71), "040a000000000000000080ff"),
            (i128::MIN, "041100000000000000000000000000000080ff"),
            (i128::MAX, "0410ffffffffffffffffffffffffffffff7f"),
        ];
        for (v, want) in cases {
            let mut b = Vec::new();
            put_i128(&mut b, v);
            assert_eq!(hex(&b), want, "{v}");
            assert_eq!(bigint_to_i128(&b[2..]), Some(v));
        }
        let mut b = Vec::new();
        put_u128(&mut b, 1 << 127);
        assert_eq!(hex(&b), "04110000000000000000000000000000008000");
        b.clear();
        put_u128(&mut b, u128::MAX);
        assert_eq!(hex(&b), "0411ffffffffffffffffffffffffffffffff00");
        assert_eq!(bigint_to_u128(&b[2..]), Some(u128::MAX));
        assert_eq!(bigint_to_i128(&b[2..]), None);
        assert_eq!(bigint_to_u128(&[0xff]), None);
        assert_eq!(bigint_to_i128(&[]), Some(0));
        assert_eq!(bigint_to_u128(&[1; 17]), None);
        // Redundant sign bytes are accepted.
        assert_eq!(
            bigint_to_i128(&[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Some(5)
        );
    }

    #[test]
    fn skip_reports_shared_ranges_and_refs() {
        // [shared [None], shared {}, ref 0, ref 1]
        let b = [
            TAG_LIST, 4, TAG_SHARED, TAG_LIST, 1, TAG_NONE, TAG_SHARED, TAG_DICT, 0, TAG_REF, 0,
            TAG_REF, 1,
        ];
        let mut ranges = Vec::new();
        let mut r = Reader::new(&b);
        let seen = skip(&mut r, 0, &mut |s, e| ranges.push((s, e))).unwrap();
        r.finish().unwrap();
        assert_eq!(ranges, [(3, 6), (7, 9)]);
        assert_eq!(
            seen,
            Skipped {
                refs: true,
                shm: false
            }
        );
        // Resumed at a shared value's bytes, its references are valid again.
        let mut again = Reader::resume(&b, 3, 0);
        assert!(matches!(Value::read(&mut again, 0), Ok(Value::List(_))));
        assert_eq!(again.pos(), 6);
        assert!(skip(&mut Reader::new(&[TAG_REF, 0]), 0, &mut |_, _| {}).is_err());
        let mut deep = [TAG_LIST, 1].repeat(MAX_DEPTH + 1);
        deep.push(TAG_NONE);
        assert_eq!(
            skip(&mut Reader::new(&deep), 0, &mut |_, _| {}),
            Err(DecodeError::TooDeep)
        );
    }

    #[test]
    fn shared_values_and_references() {
        // [[1], ref 0]: a list held twice.
        let b = [TAG_LIST, 2, TAG_SHARED, TAG_LIST, 1, TAG_NONE, TAG_REF, 0];
        let v = Value::decode(&b).unwrap();
        assert_eq!(
            v,
            Value::List(vec![
                Value::Shared(Box::new(Value::List(vec![Value::None]))),
                Value::Ref(0)
            ])
        );
        let mut again = Vec::new();
        v.encode(&mut again);
        assert_eq!(again, b);
        // A reference to an index not yet complete (or never defined) is refused: a value
        // cannot refer to itself, so references never make a cycle.
        for bad in [
            &[TAG_REF, 0][..],
            &[TAG_SHARED, TAG_LIST, 1, TAG_REF, 0],
            &[TAG_LIST, 2, TAG_SHARED, TAG_NONE, TAG_REF, 1],
            // A shared list as a dict key: unhashable.
            &[
                TAG_LIST, 2, TAG_SHARED, TAG_LIST, 0, TAG_DICT, 1, TAG_REF, 0, TAG_NONE,
            ],
        ] {
            assert!(
                matches!(Value::decode(bad), Err(DecodeError::Invalid { .. })),
                "{bad:?}"
            );
        }
        // Only a list or a dict can be shared; a marker cannot wrap another.
        for bad in [
            &[TAG_SHARED, TAG_SHARED, TAG_LIST, 0][..],
            &[TAG_SHARED, TAG_NONE],
            &[TAG_SHARED, TAG_TUPLE, 0],
        ] {
            assert!(
                matches!(Value::decode(bad), Err(DecodeError::Invalid { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Value::decode(&[TAG_SHARED]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn varint_edges() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut r = Reader::new(&b);
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
        let mut r = Reader::new(&[0xff; 11]);
        assert_eq!(r.varint(), Err(DecodeError::BadVarint { at: 0 }));
    }

    #[test]
    fn hostile_lengths_do_not_allocate() {
        // A list claiming 2^40 items in a 12-byte buffer.
        let mut b = vec![TAG_LIST];
        put_varint(&mut b, 1 << 40);
        assert!(matches!(
            Value::decode(&b),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn depth_limit() {
        let mut b = [TAG_LIST, 1].repeat(MAX_DEPTH + 1);
        b.push(TAG_NONE);
        assert_eq!(Value::decode(&b), Err(DecodeError::TooDeep));
        let mut ok = [TAG_LIST, 1].repeat(MAX_DEPTH);
        ok.push(TAG_NONE);
        assert!(Value::decode(&ok).is_ok());
    }

    #[test]
    fn corrupted_inputs() {
        assert_eq!(
            Value::decode(&[0xEE]),
            Err(DecodeError::UnknownTag { tag: 0xEE, at: 0 })
        );
        assert_eq!(
            Value::decode(&[TAG_STR, 2, 0xff, 0xfe]),
            Err(DecodeError::BadUtf8 { at: 0 })
        );
        assert_eq!(
            Value::decode(&[TAG_NONE, TAG_NONE]),
            Err(DecodeError::TrailingBytes { at: 1 })
        );
        assert_eq!(
            Value::decode(&[TAG_INT, 1, 2]),
            Err(DecodeError::Truncated { at: 1 })
        );
        assert!(matches!(
            Value::decode(&[TAG_DICT, 1, TAG_LIST, 0, TAG_NONE]),
            Err(DecodeError::Invalid { .. })
        ));
        // A registered subclass wraps a built-in value, not None.
        assert!(matches!(
            Value::decode(&[TAG_SUBCLASS, 1, b'm', 1, b'C', TAG_NONE]),
            Err(DecodeError::Invalid { .. })
        ));
        // A remote reference: worker id within u32, a type name that is a str.
        let remote = Value::Remote {
            worker: 3,
            number: 300,
            type_name: "Counter".into(),
        };
        let mut b = Vec::new();
        remote.encode(&mut b);
        assert_eq!(b[..4], [TAG_REMOTE, 3, 0xAC, 0x02]);
        assert_eq!(Value::decode(&b), Ok(remote));
        for cut in 0..b.len() {
            assert!(Value::decode(&b[..cut]).is_err());
        }
        let mut over = vec![TAG_REMOTE];
        put_varint(&mut over, 1 << 32);
        over.extend_from_slice(&[1, 0]);
        assert!(matches!(
            Value::decode(&over),
            Err(DecodeError::Invalid { .. })
        ));
        let ok = [TAG_SUBCLASS, 1, b'm', 1, b'C', TAG_LIST, 0];
        assert_eq!(
            Value::decode(&ok),
            Ok(Value::Subclass {
                class: ("m".into(), "C".into()),
                value: Box::new(Value::List(vec![])),
            })
        );
    }
}
