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
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    #[inline]
    pub fn pos(&self) -> usize {
        self.pos
    }

    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
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
            Value::BigInt(b) => {
                out.push(TAG_BIGINT);
                put_varint(out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::Float(f) => {
                out.push(TAG_FLOAT);
                out.extend_from_slice(&f.to_le_bytes());
            }
            Value::Str(s) => {
                out.push(TAG_STR);
                put_varint(out, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Value::Bytes(b) => {
                out.push(TAG_BYTES);
                put_varint(out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::List(items) | Value::Tuple(items) => {
                out.push(if matches!(self, Value::List(_)) {
                    TAG_LIST
                } else {
                    TAG_TUPLE
                });
                put_varint(out, items.len() as u64);
                for v in items {
                    v.encode(out);
                }
            }
            Value::Dict(items) => {
                out.push(TAG_DICT);
                put_varint(out, items.len() as u64);
                for (k, v) in items {
                    k.encode(out);
                    v.encode(out);
                }
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

    fn read(r: &mut Reader<'_>, depth: usize) -> Result<Value, DecodeError> {
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
                        if matches!(k, Value::List(_) | Value::Dict(_)) {
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
            tag => return Err(DecodeError::UnknownTag { tag, at }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::None),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 9..20).prop_map(Value::BigInt),
            any::<f64>()
                .prop_filter("nan != nan", |f| !f.is_nan())
                .prop_map(Value::Float),
            ".*".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Tuple),
                proptest::collection::vec((any::<i64>().prop_map(Value::Int), inner), 0..8)
                    .prop_map(Value::Dict),
            ]
        })
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
        }
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
    }
}
