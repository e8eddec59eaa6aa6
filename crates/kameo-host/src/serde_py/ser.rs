//! The serializer: the serde data model straight into wire bytes (the mapping is in
//! [`super`]'s documentation).

use kameo_proto::wire::{self, put_str, put_varint, MAX_DEPTH};
use serde::ser::{self, Serialize};

use super::error::{Error, Result};
use super::value::{raw_ser_begin, raw_ser_take, VALUE_TOKEN};

pub(crate) struct Serializer<'a> {
    out: &'a mut Vec<u8>,
    depth: usize,
}

impl<'a> Serializer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Serializer { out, depth: 0 }
    }

    #[inline]
    fn enter(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(Error::msg(format!(
                "value nested deeper than {MAX_DEPTH} levels"
            )));
        }
        self.depth += 1;
        Ok(())
    }

    #[inline]
    fn str(&mut self, s: &str) {
        self.out.push(wire::TAG_STR);
        put_str(self.out, s);
    }

    /// `{variant: ...}`: a one-key dict whose value the caller writes next.
    #[inline]
    fn variant_key(&mut self, variant: &str) -> Result<()> {
        self.enter()?;
        self.out.push(wire::TAG_DICT);
        self.out.push(1);
        self.str(variant);
        Ok(())
    }

    /// A container's tag and (declared) length; `end` fixes the length if the items counted
    /// differ (an unknown length, `None`, is declared 0).
    #[inline]
    fn open<'b>(
        &'b mut self,
        tag: u8,
        len: Option<usize>,
        variant: Option<&'static str>,
    ) -> Result<Compound<'a, 'b>> {
        self.enter()?;
        self.out.push(tag);
        let len_at = self.out.len();
        let declared = len.unwrap_or(0);
        put_varint(self.out, declared as u64);
        Ok(Compound {
            ser: self,
            len_at,
            declared,
            count: 0,
            key_at: 0,
            variant,
        })
    }
}

pub(crate) struct Compound<'a, 'b> {
    ser: &'b mut Serializer<'a>,
    len_at: usize,
    declared: usize,
    count: usize,
    /// Where the current map key starts (for the path of an error in its value).
    key_at: usize,
    /// Inside a `{variant: ...}` dict: one more level to leave, and a key for error paths.
    variant: Option<&'static str>,
}

#[cold]
fn unhashable_key(tag: u8, i: usize) -> Error {
    let ty = match tag {
        wire::TAG_LIST => "list (a sequence)",
        wire::TAG_DICT => "dict (a map or struct)",
        wire::TAG_SET => "set",
        _ => "bytearray",
    };
    Error::msg(format!(
        "a Python dict key must be hashable, and this key is a {ty}: use a tuple, str or int"
    ))
    .at_key(format!("<key {i}>"))
}

#[cold]
fn in_variant(e: Error, variant: Option<&'static str>) -> Error {
    match variant {
        Some(v) => e.at_key(v),
        None => e,
    }
}

impl Compound<'_, '_> {
    #[inline]
    fn end(self) -> Result<()> {
        if self.count != self.declared {
            let mut len = Vec::with_capacity(10);
            put_varint(&mut len, self.count as u64);
            let mut old = Vec::with_capacity(10);
            put_varint(&mut old, self.declared as u64);
            self.ser
                .out
                .splice(self.len_at..self.len_at + old.len(), len);
        }
        self.ser.depth -= 1 + usize::from(self.variant.is_some());
        Ok(())
    }

    #[inline]
    fn item<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        let i = self.count;
        self.count += 1;
        let variant = self.variant;
        value
            .serialize(&mut *self.ser)
            .map_err(|e| in_variant(e.at_index(i), variant))
    }

    #[inline]
    fn field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<()> {
        self.count += 1;
        self.ser.str(key);
        let variant = self.variant;
        value
            .serialize(&mut *self.ser)
            .map_err(|e| in_variant(e.at_key(key), variant))
    }

    /// The key written at `key_at`, for a path.
    #[cold]
    fn key_name(&self) -> String {
        let mut r = wire::Reader::resume(self.ser.out, self.key_at, 0);
        match wire::Value::read(&mut r, 0) {
            Ok(wire::Value::Str(s)) => s,
            Ok(wire::Value::Int(i)) => i.to_string(),
            _ => "<key>".to_owned(),
        }
    }
}

impl<'a, 'b> ser::Serializer for &'b mut Serializer<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Compound<'a, 'b>;
    type SerializeTuple = Compound<'a, 'b>;
    type SerializeTupleStruct = Compound<'a, 'b>;
    type SerializeTupleVariant = Compound<'a, 'b>;
    type SerializeMap = Compound<'a, 'b>;
    type SerializeStruct = Compound<'a, 'b>;
    type SerializeStructVariant = Compound<'a, 'b>;

    /// Like JSON: types with two forms (UUIDs, addresses, timestamps of other crates) take
    /// their readable one, which is what Python code reading the dicts expects.
    fn is_human_readable(&self) -> bool {
        true
    }

    #[inline]
    fn serialize_bool(self, v: bool) -> Result<()> {
        self.out
            .push(if v { wire::TAG_TRUE } else { wire::TAG_FALSE });
        Ok(())
    }

    #[inline]
    fn serialize_i8(self, v: i8) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i16(self, v: i16) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i32(self, v: i32) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_i64(self, v: i64) -> Result<()> {
        self.out.push(wire::TAG_INT);
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }

    #[inline]
    fn serialize_i128(self, v: i128) -> Result<()> {
        wire::put_i128(self.out, v);
        Ok(())
    }

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_u16(self, v: u16) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_u32(self, v: u32) -> Result<()> {
        self.serialize_i64(v.into())
    }

    #[inline]
    fn serialize_u64(self, v: u64) -> Result<()> {
        match i64::try_from(v) {
            Ok(v) => self.serialize_i64(v),
            Err(_) => self.serialize_u128(v.into()),
        }
    }

    #[inline]
    fn serialize_u128(self, v: u128) -> Result<()> {
        wire::put_u128(self.out, v);
        Ok(())
    }

    #[inline]
    fn serialize_f32(self, v: f32) -> Result<()> {
        self.serialize_f64(v.into())
    }

    #[inline]
    fn serialize_f64(self, v: f64) -> Result<()> {
        self.out.push(wire::TAG_FLOAT);
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }

    #[inline]
    fn serialize_char(self, v: char) -> Result<()> {
        self.str(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    #[inline]
    fn serialize_str(self, v: &str) -> Result<()> {
        self.str(v);
        Ok(())
    }

    #[inline]
    fn serialize_bytes(self, v: &[u8]) -> Result<()> {
        if raw_ser_take() {
            // A `Value`'s own encoding (see `value::VALUE_TOKEN`).
            self.out.extend_from_slice(v);
            return Ok(());
        }
        self.out.push(wire::TAG_BYTES);
        put_varint(self.out, v.len() as u64);
        self.out.extend_from_slice(v);
        Ok(())
    }

    #[inline]
    fn serialize_none(self) -> Result<()> {
        self.out.push(wire::TAG_NONE);
        Ok(())
    }

    #[inline]
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<()> {
        value.serialize(self)
    }

    #[inline]
    fn serialize_unit(self) -> Result<()> {
        self.serialize_none()
    }

    #[inline]
    fn serialize_unit_struct(self, _name: &'static str) -> Result<()> {
        self.serialize_none()
    }

    #[inline]
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<()> {
        self.str(variant);
        Ok(())
    }

    #[inline]
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<()> {
        if name == VALUE_TOKEN {
            raw_ser_begin();
            let r = value.serialize(&mut *self);
            // Cleared even if the inner value was not a `Value`'s (it always is: the name is
            // private).
            raw_ser_take();
            return r;
        }
        value.serialize(self)
    }

    #[inline]
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<()> {
        self.variant_key(variant)?;
        value.serialize(&mut *self).map_err(|e| e.at_key(variant))?;
        self.depth -= 1;
        Ok(())
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq> {
        self.open(wire::TAG_LIST, len, None)
    }

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple> {
        self.open(wire::TAG_TUPLE, Some(len), None)
    }

    #[inline]
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        self.open(wire::TAG_TUPLE, Some(len), None)
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        self.variant_key(variant)?;
        self.open(wire::TAG_TUPLE, Some(len), Some(variant))
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap> {
        self.open(wire::TAG_DICT, len, None)
    }

    #[inline]
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<Self::SerializeStruct> {
        self.open(wire::TAG_DICT, Some(len), None)
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant> {
        self.variant_key(variant)?;
        self.open(wire::TAG_DICT, Some(len), Some(variant))
    }
}

impl ser::SerializeSeq for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.item(value)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}

impl ser::SerializeTuple for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.item(value)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}

impl ser::SerializeTupleStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.item(value)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}

impl ser::SerializeTupleVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        self.item(value)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}

impl ser::SerializeMap for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<()> {
        let i = self.count;
        self.count += 1;
        let at = self.ser.out.len();
        self.key_at = at;
        key.serialize(&mut *self.ser)
            .map_err(|e| e.at_key(format!("<key {i}>")))?;
        // Python refuses unhashable dict keys: say so here, naming the type.
        match self.ser.out.get(at) {
            Some(&(wire::TAG_LIST | wire::TAG_DICT | wire::TAG_SET | wire::TAG_BYTEARRAY)) => {
                Err(unhashable_key(self.ser.out[at], i))
            }
            _ => Ok(()),
        }
    }

    #[inline]
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<()> {
        match value.serialize(&mut *self.ser) {
            Ok(()) => Ok(()),
            Err(e) => Err(e.at_key(self.key_name())),
        }
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}

impl ser::SerializeStruct for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.field(key, value)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}

impl ser::SerializeStructVariant for Compound<'_, '_> {
    type Ok = ();
    type Error = Error;

    #[inline]
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.field(key, value)
    }

    #[inline]
    fn end(self) -> Result<()> {
        Compound::end(self)
    }
}
