//! serde_py: Python values to and from the kameo value encoding (see `kameo_proto::wire`).
//!
//! * [`encode`]: walks CPython objects through the C API. Exact built-in types are recognised
//!   by their type pointer (the hot path); everything else goes through one classification
//!   (datetime family, enum, dataclass, NamedTuple, numpy, ...). Subclasses of built-ins are
//!   encoded as their base unless registered (`kameo.register_type`, TAG_SUBCLASS). Errors
//!   carry the path of the offending value.
//! * [`decode`]: builds Python objects straight from the bytes; malformed input is an error,
//!   never a panic or an out-of-bounds read.
//! * [`refs`]: the Python objects the rare types need (classes, numpy helpers), looked up once,
//!   and the registered subclasses.
//!
//! Large bytes-like values and numpy arrays go out of band through sealed shared-memory
//! segments (`kameo_core::shm`) when the caller gives a threshold; `kameo.encode` never does.

mod decode;
mod encode;
mod refs;

pub use decode::{decode, decode_full, DecodeFail};
pub use encode::{EncodeError, Encoder};
pub use refs::register as register_type;
pub use refs::set_ref_type;

/// Where a value may hold remote object references (instances of the class given to
/// `_native.set_ref_type`, encoded as `TAG_REMOTE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefMode {
    /// Not here (`kameo.encode`, control frames, plain requests): a SerializationError.
    Refuse,
    /// The parent's CALL bodies: only refs of the pool with this key (else RefError), all of
    /// one worker (the encoder records it, see [`Encoder::ref_worker`]).
    Parent { key: u64 },
    /// A worker's answers: written as they are.
    Worker,
    /// Internal: fail at the ref at this address (to find its path for an error message).
    #[doc(hidden)]
    Locate(usize),
}

/// The decoder's hook for remote references: `hook(worker_id, number, type_name) -> object`.
pub type RefHook = std::sync::Arc<pyo3::Py<pyo3::PyAny>>;

/// What a connection allows beyond the default value set.
#[derive(Clone, Debug)]
pub struct Options {
    /// Encode unknown types with pickle, and accept pickled values when decoding.
    pub allow_pickle: bool,
    /// Bytes-like values and arrays of at least this many bytes travel in shared memory.
    /// `usize::MAX` keeps everything inline.
    pub shm_threshold: usize,
    /// Where large `bytes`/`bytearray` buffers are copied for sending: segments reused from
    /// earlier messages (see [`kameo_core::shm::Recycler`]). None: a new sealed segment each time.
    pub recycler: Option<std::sync::Arc<kameo_core::shm::Recycler>>,
    /// How numpy arrays use shared memory on this side.
    pub arrays: Arrays,
    /// Whether values may hold remote object references.
    pub refs: RefMode,
    /// What a received remote reference becomes; None: refused when decoding.
    pub ref_hook: Option<RefHook>,
}

/// How numpy arrays use shared memory. A received array is a view on its segment only when
/// nobody but a trusted process can change the segment under it; otherwise it is a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrays {
    /// New sealed segments out; views only on segments sealed against all writes.
    Sealed,
    /// The parent: arrays out through the recycler (its segments change only once nobody
    /// holds them); views on sealed segments and on its own recycled ones (echoed back).
    Parent,
    /// A worker: new sealed segments out; views on sealed segments and on the recycled ones
    /// of the parent, which spawned this process and is trusted with it anyway.
    Worker,
}

impl Options {
    /// Inline only, no pickle: `kameo.encode` / `kameo.decode` and control frames.
    pub const INLINE: Options = Options {
        allow_pickle: false,
        shm_threshold: usize::MAX,
        recycler: None,
        arrays: Arrays::Sealed,
        refs: RefMode::Refuse,
        ref_hook: None,
    };
}

pub use kameo_core::sys::Segments;

thread_local! {
    /// The buffer `encode_to_bytes` writes into, kept between calls so that a message does
    /// not grow a new one from scratch (taken out while in use: a nested call gets its own).
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Largest scratch buffer kept for the next call.
const SCRATCH_KEEP: usize = 1 << 20;

/// Encode a whole value inline to a new `bytes`.
pub fn encode_to_bytes<'py>(
    obj: &pyo3::Bound<'py, pyo3::PyAny>,
    opts: &Options,
) -> Result<pyo3::Bound<'py, pyo3::types::PyBytes>, EncodeError> {
    let mut out = SCRATCH.with(|s| s.take());
    out.clear();
    let mut segs = Segments::new();
    let r = Encoder::new(&mut out, opts, &mut segs).encode(obj);
    debug_assert!(segs.is_empty() || opts.shm_threshold != usize::MAX);
    let r = r.map(|()| pyo3::types::PyBytes::new(obj.py(), &out));
    if out.capacity() <= SCRATCH_KEEP {
        SCRATCH.with(|s| s.set(out));
    }
    r
}

/// Encode a whole value inline to a new buffer.
pub fn encode_to_vec(
    obj: &pyo3::Bound<'_, pyo3::PyAny>,
    opts: &Options,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    let mut segs = Segments::new();
    Encoder::new(&mut out, opts, &mut segs).encode(obj)?;
    debug_assert!(segs.is_empty() || opts.shm_threshold != usize::MAX);
    Ok(out)
}
