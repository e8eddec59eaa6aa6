//! serde_py: the serde data model to and from kameo's wire format, the bytes a Python parent
//! or worker encodes and decodes (`docs/protocol.md`, "Value encoding"), with no intermediate
//! tree on the typed path.
//!
//! | serde | to wire | from wire (also accepted) |
//! |-------|---------|---------------------------|
//! | bool | False / True | |
//! | i8..i64, u8..u32 | int (0x03) | int, bigint; into any integer type that holds the value |
//! | u64, i128, u128 | int, or bigint (0x04) beyond i64 as Python writes it | int, bigint |
//! | f32, f64 | float (nan, inf kept) | float, int, bigint |
//! | char, str, String | str | (char: a str of one character) |
//! | bytes (serde_bytes) | bytes | bytes, bytearray, bytes in shared memory, a list of ints |
//! | `Vec<u8>` and other seqs | list | list, tuple, set, frozenset, NamedTuple; bytes-likes as ints |
//! | Option | None / the value | |
//! | unit, unit struct | None | |
//! | newtype struct | the inner value | |
//! | tuple, tuple struct | tuple | tuple, list, set, frozenset, NamedTuple (lengths must match) |
//! | map | dict | dict, dataclass (field names as str keys) |
//! | struct | dict with str keys | dict, dataclass, and list/tuple/NamedTuple positionally |
//! | unit variant | str of its name | str, `{"Name": None}` |
//! | newtype / tuple / struct variant | `{"Name": value}` (one key, as serde_json) | |
//! | [`Value`] | its own encoding, every type kept | any value |
//!
//! Everywhere, an enum member (0x15) stands for its value and an instance of a registered
//! subclass (0x1C) for its built-in value; a shared list or dict (0x1D / 0x1E) is
//! deserialized wherever it is referred to. datetime, date, time, timedelta, Decimal, UUID,
//! complex, numpy arrays and scalars, pickles and remote references go only into [`Value`]
//! (into a typed field: an error naming the Python type and the path). The serializer and
//! deserializer are human readable (`is_human_readable() == true`), as JSON: types of other
//! crates with two forms (UUIDs, timestamps, addresses) take their string form.
//!
//! `Some(None)` and `Some(())` serialize as None and come back as `None`, as in JSON. Map keys
//! are serialized as any value; one that would be a list or dict (a seq, a map, a struct) is
//! refused, as Python would refuse it (a dict key must be hashable: use a tuple). A Python
//! bool is not an int here: `True` goes into `bool` only.
//!
//! Errors are [`SerdeError`]s with the path of the value at fault. Input is untrusted: any
//! malformed, truncated or over-deep input (past [`kameo_proto::wire::MAX_DEPTH`]) is an error, never a
//! panic, and the bytes shared-value references make the deserializer read again are bounded
//! ([`MAX_REPLAY`]).

mod de;
mod error;
mod ser;
mod value;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use de::MAX_REPLAY;
pub use error::SerdeError;
pub use value::{Class, Date, DateTime, NdArray, Time, TimeDelta, Tz, Value};

/// Encode `v` as one wire value.
pub fn to_wire<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, SerdeError> {
    let mut out = Vec::with_capacity(64);
    to_wire_into(&mut out, v)?;
    Ok(out)
}

/// Append `v`'s encoding to `out` (a frame body being written in place). On error, `out` is
/// left as it was.
pub fn to_wire_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), SerdeError> {
    let start = out.len();
    match v.serialize(&mut ser::Serializer::new(out)) {
        Ok(()) => Ok(()),
        Err(e) => {
            out.truncate(start);
            Err(e.into_public())
        }
    }
}

/// Decode one wire value spanning all of `buf` (no shared-memory segments: a reference to
/// one is an error).
pub fn from_wire<T: DeserializeOwned>(buf: &[u8]) -> Result<T, SerdeError> {
    from_wire_with_segments(buf, &[])
}

/// As [`from_wire`], for a type that may borrow from `buf` (`&str`, `&[u8]` with
/// serde_bytes).
pub fn from_wire_borrowed<'de, T: Deserialize<'de>>(buf: &'de [u8]) -> Result<T, SerdeError> {
    run(buf, &[])
}

/// As [`from_wire`], with the frame's shared-memory segments: a shm-ref (bytes in shared
/// memory, an array's data) indexes `segments` by its descriptor index, its offset and length
/// checked against the segment.
pub fn from_wire_with_segments<T: DeserializeOwned>(
    buf: &[u8],
    segments: &[&[u8]],
) -> Result<T, SerdeError> {
    run(buf, segments)
}

fn run<'de, T: Deserialize<'de>>(buf: &'de [u8], segments: &[&[u8]]) -> Result<T, SerdeError> {
    let mut d = de::Deserializer::new(buf, segments);
    let v = T::deserialize(&mut d).map_err(error::Error::into_public)?;
    d.finish().map_err(error::Error::into_public)?;
    Ok(v)
}

#[cfg(test)]
mod tests;
