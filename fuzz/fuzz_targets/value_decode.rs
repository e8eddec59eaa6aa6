//! Arbitrary value encodings: decode must never panic or over-allocate, and whatever it accepts
//! re-encodes to a canonical form that decodes and re-encodes identically.
#![no_main]
use kameo_proto::wire::Value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Value::decode(data) {
        let mut once = Vec::new();
        v.encode(&mut once);
        let again = Value::decode(&once).expect("canonical form decodes");
        let mut twice = Vec::new();
        again.encode(&mut twice);
        assert_eq!(once, twice);
    }
});
