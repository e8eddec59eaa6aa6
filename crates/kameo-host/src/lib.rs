//! A Rust host for kameo's Python workers.
//!
//! So far this crate holds its serde layer, [`serde_py`]: any `Serialize` type to kameo's wire
//! format (the one the Python parent and workers speak, `docs/protocol.md`) and back into any
//! `Deserialize` type, with no intermediate tree, and [`Value`] for untyped data of every wire
//! type. The host itself (spawning workers, the pool, callbacks) is built on top of it.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Order { symbol: String, qty: u32 }
//!
//! let order = Order { symbol: "ACME".into(), qty: 5 };
//! let bytes = kameo_host::to_wire(&order).unwrap();      // a Python dict {"symbol": ..., "qty": 5}
//! let back: Order = kameo_host::from_wire(&bytes).unwrap();
//! assert_eq!(back, order);
//! let err = kameo_host::from_wire::<Vec<Order>>(&bytes).unwrap_err();
//! assert_eq!(err.to_string(), "at $: expected a sequence, got dict");
//! ```

pub mod serde_py;

pub use serde_py::{
    from_wire, from_wire_borrowed, from_wire_with_segments, to_wire, to_wire_into, SerdeError,
    Value,
};
