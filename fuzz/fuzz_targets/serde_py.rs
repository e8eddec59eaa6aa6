//! Arbitrary bytes into kameo-host's serde_py deserializer: never a panic (or an unbounded
//! allocation), into `Value`, typed targets and serde_json's tree, with and without
//! shared-memory segments; a `Value` it accepts encodes to bytes it reads back as the same.
#![no_main]
use std::collections::BTreeMap;

use kameo_host::{from_wire, from_wire_with_segments, to_wire, Value};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

#[derive(Deserialize)]
#[allow(dead_code)]
enum Kind {
    A,
    B(i128),
    C { x: Vec<u8>, y: (bool, u16) },
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Msg {
    name: String,
    qty: u32,
    price: f64,
    kinds: Vec<Kind>,
    #[serde(with = "serde_bytes_like")]
    raw: Vec<u8>,
    extra: Option<BTreeMap<String, Value>>,
    nested: Option<Box<Msg>>,
}

/// `Vec<u8>` through deserialize_bytes, without depending on serde_bytes.
mod serde_bytes_like {
    use serde::de::{Deserializer, Visitor};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = from_wire::<Value>(data) {
        let b = to_wire(&v).expect("a decoded Value encodes");
        let again: Value = from_wire(&b).expect("its encoding decodes");
        assert_eq!(to_wire(&again).unwrap(), b);
    }
    let _ = from_wire::<Msg>(data);
    let _ = from_wire::<Vec<Kind>>(data);
    let _ = from_wire::<serde_json::Value>(data);
    let _ = from_wire::<serde::de::IgnoredAny>(data);
    let segments: [&[u8]; 2] = [b"0123456789", b""];
    let _ = from_wire_with_segments::<Value>(data, &segments);
    let _ = from_wire_with_segments::<Msg>(data, &segments);
});
