//! The deserializer: wire bytes straight into serde visitors (the mapping is in [`super`]'s
//! documentation).
//!
//! Shared values (TAG_SHARED) are deserialized where they first occur, their byte range
//! remembered; a reference (TAG_REF) deserializes that range again with a reader resumed
//! there ([`Reader::resume`]), so a typed target gets its own copy wherever the value occurs.
//! What references make the deserializer read again is bounded ([`MAX_REPLAY`]).

use kameo_proto::wire::{self, DecodeError, Reader, ShmRef, MAX_DEPTH};
use serde::de::{self, DeserializeSeed, Visitor};

use super::error::{Error, Result};
use super::value::{raw_de_begin, raw_de_end, VALUE_TOKEN};

/// The most bytes shared-value references may make one deserialization read again beyond
/// the input itself (a chain of references can stand for a value exponentially larger than
/// its encoding).
pub const MAX_REPLAY: usize = 16 << 20;

pub(crate) struct Deserializer<'de, 's> {
    buf: &'de [u8],
    r: Reader<'de>,
    depth: usize,
    /// The byte range of each complete shared value's list or dict, by shared index.
    shared: Vec<(usize, usize)>,
    /// Inside a reference's re-read: shared values met are already in `shared`.
    replaying: usize,
    /// Bytes re-read for references so far.
    replayed: usize,
    segments: &'s [&'s [u8]],
}

impl<'de, 's> Deserializer<'de, 's> {
    pub(crate) fn new(buf: &'de [u8], segments: &'s [&'s [u8]]) -> Self {
        Deserializer {
            buf,
            r: Reader::new(buf),
            depth: 0,
            shared: Vec::new(),
            replaying: 0,
            replayed: 0,
            segments,
        }
    }

    pub(crate) fn finish(&self) -> Result<()> {
        self.r.finish().map_err(Error::decode)
    }

    #[inline]
    fn peek(&self) -> Result<u8> {
        self.r
            .peek()
            .ok_or_else(|| Error::decode(DecodeError::Truncated { at: self.r.pos() }))
    }

    /// The tag of the value here, after any enum-member or registered-subclass wrapper
    /// (consumed: both stand for the value they wrap). Not consumed itself.
    #[inline]
    fn tag(&mut self) -> Result<u8> {
        match self.peek()? {
            wire::TAG_ENUM | wire::TAG_SUBCLASS => self.unwrap_members(),
            t => Ok(t),
        }
    }

    #[inline(never)]
    fn unwrap_members(&mut self) -> Result<u8> {
        loop {
            match self.peek()? {
                wire::TAG_ENUM | wire::TAG_SUBCLASS => {
                    self.r.u8().map_err(Error::decode)?;
                    self.r.str().map_err(Error::decode)?;
                    self.r.str().map_err(Error::decode)?;
                }
                t => return Ok(t),
            }
        }
    }

    #[inline]
    fn enter(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(Error::decode(DecodeError::TooDeep));
        }
        self.depth += 1;
        Ok(())
    }

    #[inline]
    fn len(&mut self, min_each: usize) -> Result<usize> {
        self.r.len(min_each).map_err(Error::decode)
    }

    /// Consume a tag already peeked.
    #[inline]
    fn bump(&mut self) {
        let _ = self.r.u8();
    }

    #[inline]
    fn str(&mut self) -> Result<&'de str> {
        self.r.str().map_err(Error::decode)
    }

    /// A bytes-like value's bytes (the tag already consumed): inline, or from a segment.
    fn bytes_payload(&mut self, tag: u8) -> Result<Bytes<'de, 's>> {
        if tag == wire::TAG_SHM_BYTES {
            let at = self.r.pos();
            if self.r.u8().map_err(Error::decode)? > 1 {
                return Err(Error::decode(DecodeError::Invalid {
                    at,
                    why: "bad shared bytes kind",
                }));
            }
            let shm = ShmRef::read(&mut self.r).map_err(Error::decode)?;
            return Ok(Bytes::Segment(segment(self.segments, &shm)?));
        }
        let n = self.len(1)?;
        Ok(Bytes::Inline(self.r.take(n).map_err(Error::decode)?))
    }

    /// What the value here is, for an error message, in Python's terms.
    #[cold]
    fn got(&self) -> String {
        let mut r = Reader::resume(self.buf, self.r.pos(), self.r.shared_count());
        describe(self.buf, &mut r, &self.shared)
    }

    #[cold]
    fn unexpected(&self, want: &str) -> Error {
        let got = self.got();
        let hint = if self.r.peek().is_some_and(|t| {
            !matches!(
                t,
                wire::TAG_NONE
                    ..=wire::TAG_DICT
                        | wire::TAG_SET
                        | wire::TAG_FROZENSET
                        | wire::TAG_BYTEARRAY
                        | wire::TAG_SHM_BYTES
                        | wire::TAG_SHARED
                        | wire::TAG_REF
            )
        }) {
            " (deserialize into kameo_host::Value to keep it)"
        } else {
            ""
        };
        Error::msg(format!("expected {want}, got {got}{hint}"))
    }

    /// An int, into any integer type that holds it.
    #[inline]
    fn int<T>(&mut self, want: &'static str) -> Result<T>
    where
        T: TryFrom<i64> + TryFrom<i128> + TryFrom<u128>,
    {
        if let [wire::TAG_INT, b @ ..] = self.r.rest() {
            if let Some(b) = b.first_chunk::<8>() {
                let i = i64::from_le_bytes(*b);
                let _ = self.r.take(9);
                return T::try_from(i).map_err(|_| out_of_range(want, &i));
            }
        }
        self.int_slow(want)
    }

    #[inline(never)]
    fn int_slow<T>(&mut self, want: &'static str) -> Result<T>
    where
        T: TryFrom<i64> + TryFrom<i128> + TryFrom<u128>,
    {
        match self.tag()? {
            wire::TAG_INT => {
                self.bump();
                let i = self.r.i64().map_err(Error::decode)?;
                T::try_from(i).map_err(|_| out_of_range(want, &i))
            }
            wire::TAG_BIGINT => {
                self.bump();
                match self.bigint()? {
                    Wide::I(i) => T::try_from(i).map_err(|_| out_of_range(want, &i)),
                    Wide::U(u) => T::try_from(u).map_err(|_| out_of_range(want, &u)),
                }
            }
            _ => Err(self.unexpected(want)),
        }
    }

    /// A TAG_BIGINT payload (the tag consumed).
    fn bigint(&mut self) -> Result<Wide> {
        let n = self.len(1)?;
        let b = self.r.take(n).map_err(Error::decode)?;
        if let Some(i) = wire::bigint_to_i128(b) {
            Ok(Wide::I(i))
        } else if let Some(u) = wire::bigint_to_u128(b) {
            Ok(Wide::U(u))
        } else {
            Err(Error::msg(format!(
                "an int of {n} bytes is beyond 128 bits (deserialize into kameo_host::Value to keep it)"
            )))
        }
    }

    #[inline]
    fn float(&mut self, want: &'static str) -> Result<f64> {
        if let [wire::TAG_FLOAT, b @ ..] = self.r.rest() {
            if let Some(b) = b.first_chunk::<8>() {
                let f = f64::from_le_bytes(*b);
                let _ = self.r.take(9);
                return Ok(f);
            }
        }
        self.float_slow(want)
    }

    #[inline(never)]
    fn float_slow(&mut self, want: &'static str) -> Result<f64> {
        match self.tag()? {
            wire::TAG_FLOAT => {
                self.bump();
                self.r.f64().map_err(Error::decode)
            }
            // Python code writes 1 for 1.0.
            wire::TAG_INT => {
                self.bump();
                Ok(self.r.i64().map_err(Error::decode)? as f64)
            }
            wire::TAG_BIGINT => {
                self.bump();
                Ok(match self.bigint()? {
                    Wide::I(i) => i as f64,
                    Wide::U(u) => u as f64,
                })
            }
            _ => Err(self.unexpected(want)),
        }
    }

    /// The first occurrence of a shared value (at TAG_SHARED): deserialized by `f`, then
    /// its byte range remembered under the next shared index.
    #[inline(never)]
    fn shared_first<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.bump();
        self.r.shared_start().map_err(Error::decode)?;
        let start = self.r.pos();
        let v = f(self)?;
        self.r.shared_done();
        if self.replaying == 0 {
            self.shared.push((start, self.r.pos()));
        }
        Ok(v)
    }

    /// A reference (at TAG_REF): the shared value's bytes deserialized again by `f`.
    #[inline(never)]
    fn replay<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.bump();
        let i = self.r.shared_ref().map_err(Error::decode)?;
        let (start, end) = *self
            .shared
            .get(i as usize)
            .ok_or_else(|| Error::msg("reference to a shared value that is not complete"))?;
        self.replayed += end - start;
        if self.replayed > MAX_REPLAY {
            return Err(Error::msg(format!(
                "shared-value references expand the value beyond {MAX_REPLAY} bytes re-read"
            )));
        }
        let saved = std::mem::replace(&mut self.r, Reader::resume(self.buf, start, i));
        self.replaying += 1;
        let v = f(self);
        self.replaying -= 1;
        let inner = std::mem::replace(&mut self.r, saved);
        let v = v?;
        if inner.pos() != end {
            return Err(Error::msg(
                "a shared value read again did not end where it did",
            ));
        }
        Ok(v)
    }

    /// Items of a list, tuple, set, frozenset or NamedTuple (the tag consumed; for a
    /// NamedTuple, its class too) through `visitor.visit_seq`, all of them consumed.
    #[inline]
    fn seq_items<V: Visitor<'de>>(
        &mut self,
        visitor: V,
        tuple_len: Option<usize>,
    ) -> Result<V::Value> {
        let n = self.len(1)?;
        self.enter()?;
        let mut access = Seq {
            de: self,
            left: n,
            index: 0,
        };
        let v = visitor.visit_seq(&mut access)?;
        let left = access.left;
        self.depth -= 1;
        if left != 0 {
            return Err(Error::msg(match tuple_len {
                Some(want) => format!("expected {want} items, got {n}"),
                None => format!("{left} items of {n} left unread"),
            }));
        }
        Ok(v)
    }

    #[inline]
    fn dict_items<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value> {
        self.map_items(visitor, false)
    }

    /// The `n` (key, value) pairs of a dict, or (name, value) fields of a dataclass
    /// (`named`), to `visitor` as a map.
    fn map_items<V: Visitor<'de>>(&mut self, visitor: V, named: bool) -> Result<V::Value> {
        let n = self.len(2)?;
        self.enter()?;
        let mut access = Map {
            de: self,
            left: n,
            key_at: 0,
            named,
            name: "",
        };
        let v = visitor.visit_map(&mut access)?;
        let left = access.left;
        self.depth -= 1;
        if left != 0 {
            let what = if named { "fields" } else { "entries" };
            return Err(Error::msg(format!("{left} {what} of {n} left unread")));
        }
        Ok(v)
    }

    /// The bytes of a bytes-like value, as a sequence of ints (for `Vec<u8>` without
    /// serde_bytes).
    fn bytes_as_seq<V: Visitor<'de>>(&mut self, tag: u8, visitor: V) -> Result<V::Value> {
        self.bump();
        let b = self.bytes_payload(tag)?;
        let mut seq = de::value::SeqDeserializer::new(b.as_slice().iter().copied());
        let v = visitor.visit_seq(&mut seq)?;
        seq.end()?;
        Ok(v)
    }

    fn deserialize_seq_like<V: Visitor<'de>>(
        &mut self,
        visitor: V,
        tuple_len: Option<usize>,
        want: &'static str,
    ) -> Result<V::Value> {
        match self.tag()? {
            wire::TAG_LIST | wire::TAG_TUPLE | wire::TAG_SET | wire::TAG_FROZENSET => {
                self.bump();
                self.seq_items(visitor, tuple_len)
            }
            wire::TAG_NAMEDTUPLE => {
                self.bump();
                self.str()?;
                self.str()?;
                self.seq_items(visitor, tuple_len)
            }
            tag @ (wire::TAG_BYTES | wire::TAG_BYTEARRAY | wire::TAG_SHM_BYTES) => {
                self.bytes_as_seq(tag, visitor)
            }
            wire::TAG_SHARED => {
                self.shared_first(|d| d.deserialize_seq_like(visitor, tuple_len, want))
            }
            wire::TAG_REF => self.replay(|d| d.deserialize_seq_like(visitor, tuple_len, want)),
            _ => Err(self.unexpected(want)),
        }
    }

    fn deserialize_map_like<V: Visitor<'de>>(
        &mut self,
        visitor: V,
        fields_positional: bool,
        want: &'static str,
    ) -> Result<V::Value> {
        match self.tag()? {
            wire::TAG_DICT => {
                self.bump();
                self.dict_items(visitor)
            }
            wire::TAG_DATACLASS => {
                self.bump();
                self.str()?;
                self.str()?;
                self.map_items(visitor, true)
            }
            wire::TAG_LIST | wire::TAG_TUPLE | wire::TAG_NAMEDTUPLE if fields_positional => {
                self.deserialize_seq_like(visitor, None, want)
            }
            wire::TAG_SHARED => {
                self.shared_first(|d| d.deserialize_map_like(visitor, fields_positional, want))
            }
            wire::TAG_REF => {
                self.replay(|d| d.deserialize_map_like(visitor, fields_positional, want))
            }
            _ => Err(self.unexpected(want)),
        }
    }

    /// A `kameo_host::Value` (the private newtype): the raw bytes of the value here, made to
    /// stand alone (references resolved, shared memory copied in) when they do not.
    #[inline(never)]
    fn raw_value<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value> {
        let start = self.r.pos();
        let shared_before = self.r.shared_count();
        let replaying = self.replaying;
        let shared = &mut self.shared;
        let seen = wire::skip(&mut self.r, self.depth, &mut |s, e| {
            if replaying == 0 {
                shared.push((s, e));
            }
        })
        .map_err(Error::decode)?;
        if !seen.refs && !seen.shm {
            let raw = &self.buf[start..self.r.pos()];
            raw_de_begin();
            let v = visitor.visit_borrowed_bytes(raw);
            raw_de_end();
            return v;
        }
        let mut r = Reader::resume(self.buf, start, shared_before);
        let v = wire::Value::read(&mut r, self.depth).map_err(Error::decode)?;
        let v = self.resolve(v, self.depth)?;
        let mut out = Vec::new();
        v.encode(&mut out);
        raw_de_begin();
        let v = visitor.visit_byte_buf(out);
        raw_de_end();
        v
    }

    /// `v` with its references replaced by copies of what they refer to, and its shared
    /// memory by inline bytes.
    fn resolve(&mut self, v: wire::Value, depth: usize) -> Result<wire::Value> {
        use wire::Value as W;
        if depth > MAX_DEPTH {
            return Err(Error::decode(DecodeError::TooDeep));
        }
        // Lists and dicts here, the rest out of line: one small frame per level.
        Ok(match v {
            W::List(items) => W::List(self.resolve_all(items, depth)?),
            W::Dict(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (k, v) in items {
                    out.push((self.resolve(k, depth + 1)?, self.resolve(v, depth + 1)?));
                }
                W::Dict(out)
            }
            W::Shared(v) => self.resolve(*v, depth)?,
            other => self.resolve_ext(other, depth)?,
        })
    }

    fn resolve_all(&mut self, items: Vec<wire::Value>, depth: usize) -> Result<Vec<wire::Value>> {
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            out.push(self.resolve(v, depth + 1)?);
        }
        Ok(out)
    }

    #[inline(never)]
    fn resolve_ext(&mut self, v: wire::Value, depth: usize) -> Result<wire::Value> {
        use wire::Value as W;
        Ok(match v {
            W::Ref(i) => {
                let (start, end) = *self.shared.get(i as usize).ok_or_else(|| {
                    Error::msg("reference to a shared value that is not complete")
                })?;
                self.replayed += end - start;
                if self.replayed > MAX_REPLAY {
                    return Err(Error::msg(format!(
                        "shared-value references expand the value beyond {MAX_REPLAY} bytes re-read"
                    )));
                }
                let mut r = Reader::resume(self.buf, start, i);
                let v = W::read(&mut r, depth).map_err(Error::decode)?;
                self.resolve(v, depth)?
            }
            W::ShmBytes { bytearray, shm } => {
                let b = segment(self.segments, &shm)?.to_vec();
                if bytearray {
                    W::ByteArray(b)
                } else {
                    W::Bytes(b)
                }
            }
            W::Array {
                tag,
                descr,
                shape,
                fortran,
                data,
            } => W::Array {
                tag,
                descr: Box::new(self.resolve(*descr, depth + 1)?),
                shape,
                fortran,
                data: match data {
                    wire::Data::Shm(shm) => {
                        wire::Data::Inline(segment(self.segments, &shm)?.to_vec())
                    }
                    inline => inline,
                },
            },
            W::Tuple(items) => W::Tuple(self.resolve_all(items, depth)?),
            W::Set(items) => W::Set(self.resolve_all(items, depth)?),
            W::FrozenSet(items) => W::FrozenSet(self.resolve_all(items, depth)?),
            W::Object { tag, class, fields } => {
                let mut out = Vec::with_capacity(fields.len());
                for (n, v) in fields {
                    out.push((n, self.resolve(v, depth + 1)?));
                }
                W::Object {
                    tag,
                    class,
                    fields: out,
                }
            }
            W::Subclass { class, value } => W::Subclass {
                class,
                value: Box::new(self.resolve(*value, depth + 1)?),
            },
            other => other,
        })
    }

    /// Step over the value here (IgnoredAny), remembering the shared values inside it.
    fn skip(&mut self) -> Result<()> {
        let replaying = self.replaying;
        let shared = &mut self.shared;
        wire::skip(&mut self.r, self.depth, &mut |s, e| {
            if replaying == 0 {
                shared.push((s, e));
            }
        })
        .map_err(Error::decode)?;
        Ok(())
    }
}

enum Wide {
    I(i128),
    U(u128),
}

#[cold]
fn out_of_range(want: &str, v: &dyn std::fmt::Display) -> Error {
    Error::msg(format!("expected {want}, got int {v} (out of range)"))
}

enum Bytes<'de, 's> {
    Inline(&'de [u8]),
    Segment(&'s [u8]),
}

impl Bytes<'_, '_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Inline(b) | Bytes::Segment(b) => b,
        }
    }
}

/// The bytes a shared-memory reference points to, bounds-checked.
fn segment<'s>(segments: &'s [&'s [u8]], shm: &ShmRef) -> Result<&'s [u8]> {
    let seg = usize::try_from(shm.fd)
        .ok()
        .and_then(|i| segments.get(i))
        .ok_or_else(|| {
            Error::msg(format!(
                "shared memory reference to descriptor {} but the frame carried {}",
                shm.fd,
                segments.len()
            ))
        })?;
    let range = usize::try_from(shm.offset)
        .ok()
        .zip(usize::try_from(shm.len).ok())
        .and_then(|(o, n)| Some(o..o.checked_add(n)?));
    range.and_then(|r| seg.get(r)).ok_or_else(|| {
        Error::msg(format!(
            "shared memory reference {}+{} beyond its segment of {} bytes",
            shm.offset,
            shm.len,
            seg.len()
        ))
    })
}

/// The Python type of the value `r` is at.
fn describe(buf: &[u8], r: &mut Reader<'_>, shared: &[(usize, usize)]) -> String {
    let class = |r: &mut Reader<'_>| match (r.str(), r.str()) {
        (Ok(m), Ok(q)) => format!("{m}.{q}"),
        _ => "?".to_owned(),
    };
    let Ok(tag) = r.u8() else {
        return "the end of the input".to_owned();
    };
    match tag {
        wire::TAG_NONE => "None".into(),
        wire::TAG_FALSE | wire::TAG_TRUE => "bool".into(),
        wire::TAG_INT => "int".into(),
        wire::TAG_BIGINT => "int".into(),
        wire::TAG_FLOAT => "float".into(),
        wire::TAG_STR => "str".into(),
        wire::TAG_BYTES => "bytes".into(),
        wire::TAG_LIST => "list".into(),
        wire::TAG_TUPLE => "tuple".into(),
        wire::TAG_DICT => "dict".into(),
        wire::TAG_COMPLEX => "complex".into(),
        wire::TAG_SET => "set".into(),
        wire::TAG_FROZENSET => "frozenset".into(),
        wire::TAG_BYTEARRAY => "bytearray".into(),
        wire::TAG_DATETIME => "datetime.datetime".into(),
        wire::TAG_DATE => "datetime.date".into(),
        wire::TAG_TIME => "datetime.time".into(),
        wire::TAG_TIMEDELTA => "datetime.timedelta".into(),
        wire::TAG_DECIMAL => "decimal.Decimal".into(),
        wire::TAG_UUID => "uuid.UUID".into(),
        wire::TAG_ENUM => format!("enum member of {}", class(r)),
        wire::TAG_DATACLASS => format!("dataclass {}", class(r)),
        wire::TAG_NAMEDTUPLE => format!("NamedTuple {}", class(r)),
        wire::TAG_NDARRAY => "numpy.ndarray".into(),
        wire::TAG_NPSCALAR => "numpy scalar".into(),
        wire::TAG_PICKLE => "a pickled object".into(),
        wire::TAG_SHM_BYTES => match r.u8() {
            Ok(1) => "bytearray".into(),
            _ => "bytes".into(),
        },
        wire::TAG_SUBCLASS => class(r),
        wire::TAG_SHARED => describe(buf, r, shared),
        wire::TAG_REF => match r.varint().ok().and_then(|i| shared.get(i as usize)) {
            Some(&(start, _)) => {
                let mut again = Reader::resume(buf, start, 0);
                describe(buf, &mut again, shared)
            }
            None => "a shared value".into(),
        },
        wire::TAG_REMOTE => match r.remote() {
            Ok((_, _, t)) => format!("remote object {t}"),
            Err(_) => "remote object".into(),
        },
        t => format!("unknown tag {t:#04x}"),
    }
}

impl<'de> de::Deserializer<'de> for &mut Deserializer<'de, '_> {
    type Error = Error;

    fn is_human_readable(&self) -> bool {
        true
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.tag()? {
            wire::TAG_NONE => {
                self.bump();
                visitor.visit_none()
            }
            wire::TAG_FALSE => {
                self.bump();
                visitor.visit_bool(false)
            }
            wire::TAG_TRUE => {
                self.bump();
                visitor.visit_bool(true)
            }
            wire::TAG_INT => {
                self.bump();
                visitor.visit_i64(self.r.i64().map_err(Error::decode)?)
            }
            wire::TAG_BIGINT => {
                self.bump();
                match self.bigint()? {
                    Wide::I(i) => match (i64::try_from(i), u64::try_from(i)) {
                        (Ok(i), _) => visitor.visit_i64(i),
                        (_, Ok(u)) => visitor.visit_u64(u),
                        _ => visitor.visit_i128(i),
                    },
                    Wide::U(u) => visitor.visit_u128(u),
                }
            }
            wire::TAG_FLOAT => {
                self.bump();
                visitor.visit_f64(self.r.f64().map_err(Error::decode)?)
            }
            wire::TAG_STR => {
                self.bump();
                visitor.visit_borrowed_str(self.str()?)
            }
            tag @ (wire::TAG_BYTES | wire::TAG_BYTEARRAY | wire::TAG_SHM_BYTES) => {
                self.bump();
                match self.bytes_payload(tag)? {
                    Bytes::Inline(b) => visitor.visit_borrowed_bytes(b),
                    Bytes::Segment(b) => visitor.visit_bytes(b),
                }
            }
            wire::TAG_LIST
            | wire::TAG_TUPLE
            | wire::TAG_SET
            | wire::TAG_FROZENSET
            | wire::TAG_NAMEDTUPLE => self.deserialize_seq_like(visitor, None, "a sequence"),
            wire::TAG_DICT | wire::TAG_DATACLASS => {
                self.deserialize_map_like(visitor, false, "a dict")
            }
            wire::TAG_SHARED => self.shared_first(|d| d.deserialize_any(visitor)),
            wire::TAG_REF => self.replay(|d| d.deserialize_any(visitor)),
            _ => {
                Err(self.unexpected("None, bool, int, float, str, bytes, list, tuple, set or dict"))
            }
        }
    }

    #[inline]
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.tag()? {
            wire::TAG_TRUE => {
                self.bump();
                visitor.visit_bool(true)
            }
            wire::TAG_FALSE => {
                self.bump();
                visitor.visit_bool(false)
            }
            _ => Err(self.unexpected("bool")),
        }
    }

    #[inline]
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i8(self.int("i8")?)
    }

    #[inline]
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i16(self.int("i16")?)
    }

    #[inline]
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i32(self.int("i32")?)
    }

    #[inline]
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i64(self.int("i64")?)
    }

    #[inline]
    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_i128(self.int("i128")?)
    }

    #[inline]
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u8(self.int("u8")?)
    }

    #[inline]
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u16(self.int("u16")?)
    }

    #[inline]
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u32(self.int("u32")?)
    }

    #[inline]
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u64(self.int("u64")?)
    }

    #[inline]
    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_u128(self.int("u128")?)
    }

    #[inline]
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_f32(self.float("f32")? as f32)
    }

    #[inline]
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_f64(self.float("f64")?)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.tag()? != wire::TAG_STR {
            return Err(self.unexpected("char (a str of one character)"));
        }
        self.bump();
        let s = self.str()?;
        let mut chars = s.chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) => visitor.visit_char(c),
            _ => Err(Error::msg(format!(
                "expected char (a str of one character), got a str of {} characters",
                s.chars().count()
            ))),
        }
    }

    #[inline]
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.tag()? != wire::TAG_STR {
            return Err(self.unexpected("str"));
        }
        self.bump();
        visitor.visit_borrowed_str(self.str()?)
    }

    #[inline]
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.tag()? {
            tag @ (wire::TAG_BYTES | wire::TAG_BYTEARRAY | wire::TAG_SHM_BYTES) => {
                self.bump();
                match self.bytes_payload(tag)? {
                    Bytes::Inline(b) => visitor.visit_borrowed_bytes(b),
                    Bytes::Segment(b) => visitor.visit_bytes(b),
                }
            }
            wire::TAG_LIST | wire::TAG_TUPLE => self.deserialize_seq_like(visitor, None, "bytes"),
            _ => Err(self.unexpected("bytes")),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_bytes(visitor)
    }

    #[inline]
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.peek()? == wire::TAG_NONE {
            self.bump();
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.tag()? != wire::TAG_NONE {
            return Err(self.unexpected("None"));
        }
        self.bump();
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_unit(visitor)
    }

    #[inline]
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        if name == VALUE_TOKEN {
            return self.raw_value(visitor);
        }
        visitor.visit_newtype_struct(self)
    }

    #[inline]
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_seq_like(visitor, None, "a sequence")
    }

    #[inline]
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        self.deserialize_seq_like(visitor, Some(len), "a tuple")
    }

    #[inline]
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_seq_like(visitor, Some(len), "a tuple")
    }

    #[inline]
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_map_like(visitor, false, "a dict")
    }

    #[inline]
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_map_like(visitor, true, "a dict")
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        match self.tag()? {
            wire::TAG_STR => {
                self.bump();
                let variant = self.str()?;
                visitor.visit_enum(UnitVariant { variant })
            }
            wire::TAG_DICT => {
                self.bump();
                let n = self.len(2)?;
                if n != 1 {
                    return Err(Error::msg(format!(
                        "expected enum {name} (a str, or a dict of one key), got a dict of {n} keys"
                    )));
                }
                self.enter()?;
                let key_at = self.r.pos();
                let v = visitor.visit_enum(Variant { de: self, key_at })?;
                self.depth -= 1;
                Ok(v)
            }
            wire::TAG_SHARED => self.shared_first(|d| d.deserialize_enum(name, _variants, visitor)),
            wire::TAG_REF => self.replay(|d| d.deserialize_enum(name, _variants, visitor)),
            _ => Err(self.unexpected(&format!("enum {name} (a str, or a dict of one key)"))),
        }
    }

    #[inline]
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.tag()? {
            wire::TAG_STR => {
                self.bump();
                visitor.visit_borrowed_str(self.str()?)
            }
            wire::TAG_INT => {
                self.bump();
                let i = self.r.i64().map_err(Error::decode)?;
                match u64::try_from(i) {
                    Ok(u) => visitor.visit_u64(u),
                    Err(_) => Err(out_of_range("a field or variant index", &i)),
                }
            }
            _ => Err(self.unexpected("a field or variant name (str)")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.skip()?;
        visitor.visit_unit()
    }
}

struct Seq<'a, 'de, 's> {
    de: &'a mut Deserializer<'de, 's>,
    left: usize,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for Seq<'_, 'de, '_> {
    type Error = Error;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let i = self.index;
        self.index += 1;
        match seed.deserialize(&mut *self.de) {
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(e.at_index(i)),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Map<'a, 'de, 's> {
    de: &'a mut Deserializer<'de, 's>,
    left: usize,
    /// Where the current key starts (for the path of an error in its value).
    key_at: usize,
    /// A dataclass's fields: each key a bare str, no tag.
    named: bool,
    name: &'de str,
}

impl Map<'_, '_, '_> {
    #[cold]
    fn key_name(&self) -> String {
        if self.named {
            return self.name.to_owned();
        }
        let mut r = Reader::resume(self.de.buf, self.key_at, 0);
        match wire::Value::read(&mut r, 0) {
            Ok(wire::Value::Str(s)) => s,
            Ok(wire::Value::Int(i)) => i.to_string(),
            _ => "<key>".to_owned(),
        }
    }
}

impl<'de> de::MapAccess<'de> for Map<'_, 'de, '_> {
    type Error = Error;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        if self.named {
            self.name = self.de.str()?;
            let key: de::value::BorrowedStrDeserializer<'de, Error> =
                de::value::BorrowedStrDeserializer::new(self.name);
            return seed.deserialize(key).map(Some);
        }
        self.key_at = self.de.r.pos();
        seed.deserialize(&mut *self.de).map(Some)
    }

    #[inline]
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        match seed.deserialize(&mut *self.de) {
            Ok(v) => Ok(v),
            Err(e) => Err(e.at_key(self.key_name())),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

/// An enum from a str: a unit variant.
struct UnitVariant<'de> {
    variant: &'de str,
}

impl<'de> de::EnumAccess<'de> for UnitVariant<'de> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let name: de::value::BorrowedStrDeserializer<'de, Error> =
            de::value::BorrowedStrDeserializer::new(self.variant);
        Ok((seed.deserialize(name)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for UnitVariant<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<()> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value> {
        Err(self.needs_value())
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value> {
        Err(self.needs_value())
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value> {
        Err(self.needs_value())
    }
}

impl UnitVariant<'_> {
    #[cold]
    fn needs_value(&self) -> Error {
        Error::msg(format!(
            "variant {0} holds a value: expected a dict {{\"{0}\": value}}, got the str \"{0}\"",
            self.variant
        ))
    }
}

/// An enum from a one-key dict: the key names the variant, the value is its content.
struct Variant<'a, 'de, 's> {
    de: &'a mut Deserializer<'de, 's>,
    key_at: usize,
}

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de, '_> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let v = seed.deserialize(&mut *self.de)?;
        Ok((v, self))
    }
}

impl Variant<'_, '_, '_> {
    #[cold]
    fn in_variant(&self, e: Error) -> Error {
        let mut r = Reader::resume(self.de.buf, self.key_at, 0);
        match wire::Value::read(&mut r, 0) {
            Ok(wire::Value::Str(s)) => e.at_key(s),
            _ => e,
        }
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de, '_> {
    type Error = Error;

    fn unit_variant(self) -> Result<()> {
        // `{"Variant": None}`
        match <() as de::Deserialize>::deserialize(&mut *self.de) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.in_variant(e)),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        match seed.deserialize(&mut *self.de) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.in_variant(e)),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        match de::Deserializer::deserialize_tuple(&mut *self.de, len, visitor) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.in_variant(e)),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        match de::Deserializer::deserialize_struct(&mut *self.de, "", fields, visitor) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.in_variant(e)),
        }
    }
}
