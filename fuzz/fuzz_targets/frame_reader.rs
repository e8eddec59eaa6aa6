//! Arbitrary bytes, delivered in arbitrary chunks, through the frame reader: it must never
//! panic, never buffer an oversize frame, and always make progress.
#![no_main]
use kameo_proto::frame::{Event, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut reader = FrameReader::new(4096);
    for piece in rest.chunks(chunk) {
        reader.feed(piece);
        loop {
            match reader.next_event() {
                Ok(Some(Event::Frame(env))) => {
                    assert!(env.body.len() <= 4096);
                }
                Ok(Some(Event::Oversize { size, limit, .. })) => assert!(size > limit),
                Ok(None) => break,
                Err(_) => return, // the connection would be dropped
            }
        }
        assert!(reader.buffered() <= 4096 + 4 + piece.len());
    }
});
