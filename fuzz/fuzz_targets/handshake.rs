//! Arbitrary HELLO bodies: decode must never panic, and whatever it accepts re-encodes to the
//! same bytes.
#![no_main]
use kameo_proto::handshake::Hello;
use kameo_proto::PROTOCOL_VERSION;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data, PROTOCOL_VERSION) {
        assert_eq!(hello.encode(), data);
    }
});
