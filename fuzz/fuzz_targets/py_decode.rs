//! Arbitrary bytes through the real decoder (`kameo._native`, pyo3) in an embedded
//! interpreter: it must never panic or crash, only return values or errors; and whatever it
//! decodes and encodes again must decode.
//!
//! Decoding an enum, dataclass or NamedTuple imports the module its class names. So that the
//! fuzzer cannot import arbitrary modules (some have side effects), the modules the decoder
//! may need are imported first and every later import is refused: classes resolve only in
//! modules already loaded. numpy is used when the interpreter can import it.
//!
//! Leak detection is off: the interpreter keeps objects alive until exit by design (interned
//! strs, caches, modules), which LeakSanitizer would report after every run.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pyo3::prelude::*;

const SETUP: &std::ffi::CStr = c"
import sys, collections, dataclasses, datetime, decimal, enum, typing, uuid, zoneinfo
try:
    import numpy, numpy.lib.format
except ImportError:
    pass

class NoImports:
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f'the fuzz target imports no new module ({name})')

sys.meta_path.insert(0, NoImports())
";

/// AddressSanitizer options for this binary (read at start-up; the environment can still
/// override them).
#[no_mangle]
pub extern "C" fn __asan_default_options() -> *const std::ffi::c_char {
    c"detect_leaks=0".as_ptr()
}

fn setup() {
    Python::attach(|py| {
        py.run(SETUP, None, None).expect("fuzz setup");
    });
}

fuzz_target!(init: setup(), |data: &[u8]| {
    Python::attach(|py| kameo_native_fuzz(py, data));
});

fn kameo_native_fuzz(py: Python<'_>, data: &[u8]) {
    _native::fuzz_decode(py, data);
}
