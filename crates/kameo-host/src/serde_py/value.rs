//! [`Value`]: untyped data of every wire type.
//!
//! Decoding goes through kameo-proto's one decoder ([`wire::Value::decode`]); a `Value` is
//! a typed view of its result (temporal fields parsed, classes named, shared values and
//! shared memory resolved by the deserializer before it gets here).
//!
//! Through this crate's serializer and deserializer a `Value` passes as its raw encoding: it
//! serializes and deserializes as a newtype struct of a private name ([`VALUE_TOKEN`]) that
//! both recognise (as serde_json's `RawValue` does); a thread-local flag, set by them just
//! around the call, tells `Value`'s own impls that the bytes they get or give are wire bytes.
//! With any other format (serde_json, ...) the same impls use a plain mapping: sets and tuples
//! as sequences, datetimes as ISO 8601 strings, and so on (see [`Value`]).

use std::cell::Cell;
use std::fmt;

pub use kameo_proto::wire::Tz;
use kameo_proto::wire::{self, Reader};
use serde::de::{self, Visitor};
use serde::ser::{self, SerializeMap, SerializeSeq, SerializeStruct, SerializeTuple};
use serde::{Deserialize, Serialize};

use super::error::Error;

/// The newtype name that carries a [`Value`]'s raw encoding through this crate's serde impls.
pub(crate) const VALUE_TOKEN: &str = "$kameo_host::private::Value";

thread_local! {
    /// 1: the serializer is inside a `Value`'s newtype; 2: its next `serialize_bytes` is the
    /// raw encoding.
    static RAW_SER: Cell<u8> = const { Cell::new(0) };
    /// The deserializer hands a `Value`'s visitor its raw encoding.
    static RAW_DE: Cell<bool> = const { Cell::new(false) };
}

pub(crate) fn raw_ser_begin() {
    RAW_SER.with(|c| c.set(1));
}

/// Whether the bytes being serialized are a `Value`'s raw encoding (then clears the state;
/// also called to clear it after the newtype).
#[inline]
pub(crate) fn raw_ser_take() -> bool {
    RAW_SER.with(|c| c.replace(0) == 2)
}

pub(crate) fn raw_de_begin() {
    RAW_DE.with(|c| c.set(true));
}

pub(crate) fn raw_de_end() {
    RAW_DE.with(|c| c.set(false));
}

/// A Python class: its `__module__` and `__qualname__`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Class {
    pub module: String,
    pub qualname: String,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.qualname)
    }
}

/// A `datetime.datetime`. `fold` is Python's (0 or 1).
#[derive(Debug, Clone, PartialEq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub microsecond: u32,
    pub fold: u8,
    pub tz: Tz,
}

/// A `datetime.date`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

/// A `datetime.time`.
#[derive(Debug, Clone, PartialEq)]
pub struct Time {
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub microsecond: u32,
    pub fold: u8,
    pub tz: Tz,
}

/// A `datetime.timedelta`, normalised as Python keeps it (`0 <= seconds < 86400`,
/// `0 <= microseconds < 1_000_000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeDelta {
    pub days: i32,
    pub seconds: i32,
    pub microseconds: i32,
}

/// A numpy array (or, `scalar`, a numpy scalar: a 0-d array): dtype descr
/// (`numpy.lib.format.dtype_to_descr`, a str such as `"<f8"` or a list for structured
/// dtypes), shape, memory order, and the raw data bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    pub descr: Box<Value>,
    pub shape: Vec<u64>,
    pub fortran: bool,
    pub data: Vec<u8>,
    pub scalar: bool,
}

/// Untyped data: any value the wire format carries.
///
/// With this crate's `to_wire`/`from_wire` every variant keeps its Python type both ways.
/// With other serde formats it maps plainly: `None` to unit, `BigInt` to u64 when it fits,
/// else its decimal str (beyond 128 bits its bytes), tuples, sets and NamedTuples to sequences, dataclasses and
/// `Remote` to maps, `Complex` to `[re, im]`, datetimes to ISO 8601 strings (a zone key
/// appended as `[Europe/Paris]`), `TimeDelta` to `{days, seconds, microseconds}`,
/// `Decimal` to its str, `Uuid` to its hyphenated hex, `Enum` and `Subclass` to their
/// value, `NdArray` to `{descr, shape, fortran, data}`; and from other formats a `Value`
/// gets only the plain types (None, Bool, Int/BigInt, Float, Str, Bytes, List, Dict).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An int beyond i64: little-endian two's complement, as Python's encoder writes it
    /// ([`Value::as_i128`], [`Value::as_u128`]; `Value::from(i128)` makes one).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    ByteArray(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Pairs in insertion order.
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    FrozenSet(Vec<Value>),
    Complex {
        re: f64,
        im: f64,
    },
    DateTime(DateTime),
    Date(Date),
    Time(Time),
    TimeDelta(TimeDelta),
    /// `str(d)` of a `decimal.Decimal`.
    Decimal(String),
    /// The 16 bytes of a `uuid.UUID`, big-endian (`UUID.bytes`).
    Uuid([u8; 16]),
    /// A member of an `enum.Enum` class, by its value.
    Enum {
        class: Class,
        value: Box<Value>,
    },
    Dataclass {
        class: Class,
        fields: Vec<(String, Value)>,
    },
    NamedTuple {
        class: Class,
        fields: Vec<Value>,
    },
    NdArray(NdArray),
    /// A pickled object (sent with `allow_pickle=True`): the pickle bytes.
    Pickle(Vec<u8>),
    /// A reference to an object living in a worker.
    Remote {
        worker: u32,
        number: u64,
        type_name: String,
    },
    /// An instance of a subclass of a built-in type registered with `kameo.register_type`:
    /// its class and its value as the built-in base.
    Subclass {
        class: Class,
        value: Box<Value>,
    },
}

impl Value {
    /// An int's value, if it is one (Int or BigInt) and fits.
    pub fn as_i128(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some((*i).into()),
            Value::BigInt(b) => wire::bigint_to_i128(b),
            _ => None,
        }
    }

    /// As [`Value::as_i128`], for a non-negative int up to `u128::MAX`.
    pub fn as_u128(&self) -> Option<u128> {
        match self {
            Value::Int(i) => u128::try_from(*i).ok(),
            Value::BigInt(b) => wire::bigint_to_u128(b),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value under str key `key` of a dict, or field `key` of a dataclass.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            Value::Dataclass { fields, .. } => {
                fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// The Python type name of the value (`"int"`, `"datetime.datetime"`, a class's name).
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::ByteArray(_) => "bytearray".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::FrozenSet(_) => "frozenset".into(),
            Value::Complex { .. } => "complex".into(),
            Value::DateTime(_) => "datetime.datetime".into(),
            Value::Date(_) => "datetime.date".into(),
            Value::Time(_) => "datetime.time".into(),
            Value::TimeDelta(_) => "datetime.timedelta".into(),
            Value::Decimal(_) => "decimal.Decimal".into(),
            Value::Uuid(_) => "uuid.UUID".into(),
            Value::Enum { class, .. }
            | Value::Dataclass { class, .. }
            | Value::NamedTuple { class, .. }
            | Value::Subclass { class, .. } => class.to_string(),
            Value::NdArray(a) if a.scalar => "numpy scalar".into(),
            Value::NdArray(_) => "numpy.ndarray".into(),
            Value::Pickle(_) => "pickled object".into(),
            Value::Remote { type_name, .. } => type_name.clone(),
        }
    }

    /// The wire model of this value (for encoding).
    pub(crate) fn to_wire_value(&self) -> wire::Value {
        use wire::Value as W;
        let all = |items: &[Value]| items.iter().map(Value::to_wire_value).collect();
        let class = |c: &Class| (c.module.clone(), c.qualname.clone());
        match self {
            Value::None => W::None,
            Value::Bool(b) => W::Bool(*b),
            Value::Int(i) => W::Int(*i),
            Value::BigInt(b) => W::BigInt(b.clone()),
            Value::Float(f) => W::Float(*f),
            Value::Str(s) => W::Str(s.clone()),
            Value::Bytes(b) => W::Bytes(b.clone()),
            Value::ByteArray(b) => W::ByteArray(b.clone()),
            Value::List(items) => W::List(all(items)),
            Value::Tuple(items) => W::Tuple(all(items)),
            Value::Dict(items) => W::Dict(
                items
                    .iter()
                    .map(|(k, v)| (k.to_wire_value(), v.to_wire_value()))
                    .collect(),
            ),
            Value::Set(items) => W::Set(all(items)),
            Value::FrozenSet(items) => W::FrozenSet(all(items)),
            Value::Complex { re, im } => W::Complex(*re, *im),
            Value::DateTime(d) => {
                let mut fixed = Vec::with_capacity(wire::DATETIME_FIXED);
                fixed.extend_from_slice(&d.year.to_le_bytes());
                fixed.extend_from_slice(&[d.month, d.day, d.hour, d.minute, d.second]);
                fixed.extend_from_slice(&d.microsecond.to_le_bytes());
                fixed.push(d.fold);
                W::Temporal {
                    tag: wire::TAG_DATETIME,
                    fixed,
                    tz: Some(d.tz.clone()),
                }
            }
            Value::Date(d) => {
                let mut fixed = d.year.to_le_bytes().to_vec();
                fixed.extend_from_slice(&[d.month, d.day]);
                W::Temporal {
                    tag: wire::TAG_DATE,
                    fixed,
                    tz: None,
                }
            }
            Value::Time(t) => {
                let mut fixed = vec![t.hour, t.minute, t.second];
                fixed.extend_from_slice(&t.microsecond.to_le_bytes());
                fixed.push(t.fold);
                W::Temporal {
                    tag: wire::TAG_TIME,
                    fixed,
                    tz: Some(t.tz.clone()),
                }
            }
            Value::TimeDelta(d) => {
                let mut fixed = d.days.to_le_bytes().to_vec();
                fixed.extend_from_slice(&d.seconds.to_le_bytes());
                fixed.extend_from_slice(&d.microseconds.to_le_bytes());
                W::Temporal {
                    tag: wire::TAG_TIMEDELTA,
                    fixed,
                    tz: None,
                }
            }
            Value::Decimal(s) => W::Decimal(s.clone()),
            Value::Uuid(b) => W::Uuid(*b),
            Value::Enum { class: c, value } => W::Object {
                tag: wire::TAG_ENUM,
                class: class(c),
                fields: vec![(None, value.to_wire_value())],
            },
            Value::Dataclass { class: c, fields } => W::Object {
                tag: wire::TAG_DATACLASS,
                class: class(c),
                fields: fields
                    .iter()
                    .map(|(n, v)| (Some(n.clone()), v.to_wire_value()))
                    .collect(),
            },
            Value::NamedTuple { class: c, fields } => W::Object {
                tag: wire::TAG_NAMEDTUPLE,
                class: class(c),
                fields: fields.iter().map(|v| (None, v.to_wire_value())).collect(),
            },
            Value::NdArray(a) => W::Array {
                tag: if a.scalar {
                    wire::TAG_NPSCALAR
                } else {
                    wire::TAG_NDARRAY
                },
                descr: Box::new(a.descr.to_wire_value()),
                shape: a.shape.clone(),
                fortran: a.fortran,
                data: wire::Data::Inline(a.data.clone()),
            },
            Value::Pickle(b) => W::Pickle(b.clone()),
            Value::Remote {
                worker,
                number,
                type_name,
            } => W::Remote {
                worker: *worker,
                number: *number,
                type_name: type_name.clone(),
            },
            Value::Subclass { class: c, value } => W::Subclass {
                class: class(c),
                value: Box::new(value.to_wire_value()),
            },
        }
    }

    /// The value a wire model stands for. `w` must stand alone: no references (TAG_REF) or
    /// shared memory, which the deserializer resolves before.
    pub(crate) fn from_wire_value(w: wire::Value) -> Result<Value, Error> {
        use wire::Value as W;
        // Containers here, the rest out of line: one small frame per level of nesting.
        Ok(match w {
            W::List(items) => Value::List(Value::all(items)?),
            W::Tuple(items) => Value::Tuple(Value::all(items)?),
            W::Dict(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (k, v) in items {
                    out.push((Value::from_wire_value(k)?, Value::from_wire_value(v)?));
                }
                Value::Dict(out)
            }
            W::Shared(v) => Value::from_wire_value(*v)?,
            other => Value::from_wire_ext(other)?,
        })
    }

    fn all(items: Vec<wire::Value>) -> Result<Vec<Value>, Error> {
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            out.push(Value::from_wire_value(v)?);
        }
        Ok(out)
    }

    #[inline(never)]
    fn from_wire_ext(w: wire::Value) -> Result<Value, Error> {
        use wire::Value as W;
        let all = Value::all;
        let class = |(module, qualname): (String, String)| Class { module, qualname };
        Ok(match w {
            W::None => Value::None,
            W::Bool(b) => Value::Bool(b),
            W::Int(i) => Value::Int(i),
            W::BigInt(b) => Value::BigInt(b),
            W::Float(f) => Value::Float(f),
            W::Str(s) => Value::Str(s),
            W::Bytes(b) => Value::Bytes(b),
            W::ByteArray(b) => Value::ByteArray(b),
            W::Set(items) => Value::Set(all(items)?),
            W::FrozenSet(items) => Value::FrozenSet(all(items)?),
            W::Complex(re, im) => Value::Complex { re, im },
            W::Temporal { tag, fixed, tz } => temporal(tag, &fixed, tz)?,
            W::Decimal(s) => Value::Decimal(s),
            W::Uuid(b) => Value::Uuid(b),
            W::Object {
                tag,
                class: c,
                fields,
            } => match tag {
                wire::TAG_ENUM => {
                    let value = fields
                        .into_iter()
                        .next()
                        .map(|(_, v)| v)
                        .ok_or_else(|| Error::msg("an enum member without its value"))?;
                    Value::Enum {
                        class: class(c),
                        value: Box::new(Value::from_wire_value(value)?),
                    }
                }
                wire::TAG_DATACLASS => Value::Dataclass {
                    class: class(c),
                    fields: fields
                        .into_iter()
                        .map(|(n, v)| Ok((n.unwrap_or_default(), Value::from_wire_value(v)?)))
                        .collect::<Result<_, Error>>()?,
                },
                _ => Value::NamedTuple {
                    class: class(c),
                    fields: all(fields.into_iter().map(|(_, v)| v).collect())?,
                },
            },
            W::Subclass { class: c, value } => Value::Subclass {
                class: class(c),
                value: Box::new(Value::from_wire_value(*value)?),
            },
            W::Array {
                tag,
                descr,
                shape,
                fortran,
                data,
            } => Value::NdArray(NdArray {
                descr: Box::new(Value::from_wire_value(*descr)?),
                shape,
                fortran,
                data: match data {
                    wire::Data::Inline(b) => b,
                    wire::Data::Shm(_) => {
                        return Err(Error::msg("array data in shared memory not resolved"))
                    }
                },
                scalar: tag == wire::TAG_NPSCALAR,
            }),
            W::Pickle(b) => Value::Pickle(b),
            W::Remote {
                worker,
                number,
                type_name,
            } => Value::Remote {
                worker,
                number,
                type_name,
            },
            // Containers are handled by `from_wire_value`.
            w @ (W::List(_) | W::Tuple(_) | W::Dict(_) | W::Shared(_)) => {
                Value::from_wire_value(w)?
            }
            W::Ref(_) | W::ShmBytes { .. } => {
                return Err(Error::msg(
                    "a shared-value reference or shared memory not resolved",
                ))
            }
        })
    }

    /// Encode as wire bytes (what `to_wire(&value)` gives).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        self.to_wire_value().encode(out);
    }

    /// Decode wire bytes that stand alone.
    pub(crate) fn decode(b: &[u8]) -> Result<Value, Error> {
        Value::from_wire_value(wire::Value::decode(b).map_err(Error::decode)?)
    }
}

fn temporal(tag: u8, fixed: &[u8], tz: Option<Tz>) -> Result<Value, Error> {
    let mut r = Reader::new(fixed);
    let d = || Error::msg("a short temporal value");
    let tz = || {
        tz.clone()
            .ok_or_else(|| Error::msg("a datetime without its tz"))
    };
    Ok(match tag {
        wire::TAG_DATETIME => Value::DateTime(DateTime {
            year: r.u16().map_err(|_| d())?,
            month: r.u8().map_err(|_| d())?,
            day: r.u8().map_err(|_| d())?,
            hour: r.u8().map_err(|_| d())?,
            minute: r.u8().map_err(|_| d())?,
            second: r.u8().map_err(|_| d())?,
            microsecond: r.u32().map_err(|_| d())?,
            fold: r.u8().map_err(|_| d())?,
            tz: tz()?,
        }),
        wire::TAG_DATE => Value::Date(Date {
            year: r.u16().map_err(|_| d())?,
            month: r.u8().map_err(|_| d())?,
            day: r.u8().map_err(|_| d())?,
        }),
        wire::TAG_TIME => Value::Time(Time {
            hour: r.u8().map_err(|_| d())?,
            minute: r.u8().map_err(|_| d())?,
            second: r.u8().map_err(|_| d())?,
            microsecond: r.u32().map_err(|_| d())?,
            fold: r.u8().map_err(|_| d())?,
            tz: tz()?,
        }),
        _ => Value::TimeDelta(TimeDelta {
            days: r.i32().map_err(|_| d())?,
            seconds: r.i32().map_err(|_| d())?,
            microseconds: r.i32().map_err(|_| d())?,
        }),
    })
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<i128> for Value {
    fn from(v: i128) -> Self {
        let mut b = Vec::new();
        wire::put_i128(&mut b, v);
        Value::decode(&b).expect("an int encodes")
    }
}

impl From<u128> for Value {
    fn from(v: u128) -> Self {
        let mut b = Vec::new();
        wire::put_u128(&mut b, v);
        Value::decode(&b).expect("an int encodes")
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}

impl fmt::Display for Tzd<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Tz::Naive => Ok(()),
            Tz::Utc => f.write_str("+00:00"),
            Tz::Fixed { offset_us, .. } => {
                let sign = if *offset_us < 0 { '-' } else { '+' };
                let us = offset_us.unsigned_abs();
                let (h, m, s, frac) = (
                    us / 3_600_000_000,
                    us / 60_000_000 % 60,
                    us / 1_000_000 % 60,
                    us % 1_000_000,
                );
                write!(f, "{sign}{h:02}:{m:02}")?;
                if s != 0 || frac != 0 {
                    write!(f, ":{s:02}")?;
                }
                if frac != 0 {
                    write!(f, ".{frac:06}")?;
                }
                Ok(())
            }
            Tz::Zone(key) => write!(f, "[{key}]"),
        }
    }
}

/// A tz as ISO 8601 writes it (`isoformat()`'s offset; a zone key in brackets).
struct Tzd<'a>(&'a Tz);

fn clock(h: u8, m: u8, s: u8, us: u32) -> String {
    if us == 0 {
        format!("{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{us:06}")
    }
}

/// The plain mapping of a `Value`, for other serde formats.
struct Plain<'a>(&'a Value);

impl Serialize for Plain<'_> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if RAW_SER.with(|c| c.get()) == 1 {
            // Our serializer: the value's own encoding.
            RAW_SER.with(|c| c.set(2));
            let mut out = Vec::new();
            self.0.encode(&mut out);
            return s.serialize_bytes(&out);
        }
        let seq = |s: S, items: &[Value]| {
            let mut q = s.serialize_seq(Some(items.len()))?;
            for v in items {
                q.serialize_element(&Plain(v))?;
            }
            q.end()
        };
        match self.0 {
            Value::None => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            // Formats without 128-bit ints (JSON) get a decimal str.
            Value::BigInt(b) => match (self.0.as_i128(), self.0.as_u128()) {
                (Some(i), _) => match (i64::try_from(i), u64::try_from(i)) {
                    (Ok(i), _) => s.serialize_i64(i),
                    (_, Ok(u)) => s.serialize_u64(u),
                    _ => s.collect_str(&i),
                },
                (_, Some(u)) => s.collect_str(&u),
                _ => s.serialize_bytes(b),
            },
            Value::Float(f) => s.serialize_f64(*f),
            Value::Str(v) | Value::Decimal(v) => s.serialize_str(v),
            Value::Bytes(b) | Value::ByteArray(b) | Value::Pickle(b) => s.serialize_bytes(b),
            Value::List(items)
            | Value::Tuple(items)
            | Value::Set(items)
            | Value::FrozenSet(items)
            | Value::NamedTuple { fields: items, .. } => seq(s, items),
            Value::Dict(items) => {
                let mut m = s.serialize_map(Some(items.len()))?;
                for (k, v) in items {
                    m.serialize_entry(&Plain(k), &Plain(v))?;
                }
                m.end()
            }
            Value::Dataclass { fields, .. } => {
                let mut m = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    m.serialize_entry(k, &Plain(v))?;
                }
                m.end()
            }
            Value::Complex { re, im } => {
                let mut t = s.serialize_tuple(2)?;
                t.serialize_element(re)?;
                t.serialize_element(im)?;
                t.end()
            }
            Value::DateTime(d) => s.collect_str(&format_args!(
                "{:04}-{:02}-{:02}T{}{}",
                d.year,
                d.month,
                d.day,
                clock(d.hour, d.minute, d.second, d.microsecond),
                Tzd(&d.tz)
            )),
            Value::Date(d) => {
                s.collect_str(&format_args!("{:04}-{:02}-{:02}", d.year, d.month, d.day))
            }
            Value::Time(t) => s.collect_str(&format_args!(
                "{}{}",
                clock(t.hour, t.minute, t.second, t.microsecond),
                Tzd(&t.tz)
            )),
            Value::TimeDelta(d) => {
                let mut st = s.serialize_struct("TimeDelta", 3)?;
                st.serialize_field("days", &d.days)?;
                st.serialize_field("seconds", &d.seconds)?;
                st.serialize_field("microseconds", &d.microseconds)?;
                st.end()
            }
            Value::Uuid(b) => {
                let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
                s.collect_str(&format_args!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                ))
            }
            Value::Enum { value, .. } | Value::Subclass { value, .. } => Plain(value).serialize(s),
            Value::NdArray(a) => {
                let mut st = s.serialize_struct("NdArray", 4)?;
                st.serialize_field("descr", &Plain(&a.descr))?;
                st.serialize_field("shape", &a.shape)?;
                st.serialize_field("fortran", &a.fortran)?;
                st.serialize_field("data", &Bytes(&a.data))?;
                st.end()
            }
            Value::Remote {
                worker,
                number,
                type_name,
            } => {
                let mut st = s.serialize_struct("Remote", 3)?;
                st.serialize_field("worker", worker)?;
                st.serialize_field("number", number)?;
                st.serialize_field("type_name", type_name)?;
                st.end()
            }
        }
    }
}

struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Serialize for Value {
    fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct(VALUE_TOKEN, &Plain(self))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_newtype_struct(VALUE_TOKEN, ValueVisitor)
    }
}

struct ValueVisitor;

impl ValueVisitor {
    fn int<E: de::Error>(v: i128) -> Result<Value, E> {
        Ok(Value::from(v))
    }
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        // Another format: the plain mapping.
        d.deserialize_any(ValueVisitor)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Self::int(v.into())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Self::int(v)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        if RAW_DE.with(|c| c.replace(false)) {
            // Our deserializer: the value's own encoding, standing alone.
            return Value::decode(v).map_err(E::custom);
        }
        Ok(Value::Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Value, E> {
        if RAW_DE.with(|c| c.get()) {
            return self.visit_bytes(&v);
        }
        Ok(Value::Bytes(v))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::None)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = a.next_element()? {
            items.push(v);
        }
        Ok(Value::List(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
        while let Some(kv) = a.next_entry()? {
            items.push(kv);
        }
        Ok(Value::Dict(items))
    }
}
