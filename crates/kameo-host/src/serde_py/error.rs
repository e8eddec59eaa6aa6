//! [`SerdeError`], and the error type the serializer and deserializer pass around while the
//! path is still being built (innermost segment first, as the error unwinds).

use std::fmt;

use kameo_proto::wire::DecodeError;

/// Why a value could not be serialized to, or deserialized from, the wire format.
///
/// `path` says where in the value: `$` for the root, else field names, dict keys and indices
/// from the root (`orders[3].qty`, `$[2]`, `prices["a b"]`). `Display` gives
/// `at orders[3].qty: expected u32, got str`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerdeError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for SerdeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {}: {}", self.path, self.message)
    }
}

impl std::error::Error for SerdeError {}

/// One step of a path.
#[derive(Debug)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug)]
struct Inner {
    message: String,
    /// Innermost first.
    path: Vec<Seg>,
}

/// The serde error type of this module's serializer and deserializer: boxed, so that the
/// `Result`s of the hot path stay small.
#[derive(Debug)]
pub(crate) struct Error(Box<Inner>);

pub(crate) type Result<T> = std::result::Result<T, Error>;

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

impl Error {
    pub(crate) fn msg(message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            message: message.into(),
            path: Vec::new(),
        }))
    }

    pub(crate) fn decode(e: DecodeError) -> Self {
        Error::msg(e.to_string())
    }

    /// The error happened inside the value under key (or field) `key`.
    #[cold]
    pub(crate) fn at_key(mut self, key: impl Into<String>) -> Self {
        self.0.path.push(Seg::Key(key.into()));
        self
    }

    /// The error happened inside the item at `index`.
    #[cold]
    pub(crate) fn at_index(mut self, index: usize) -> Self {
        self.0.path.push(Seg::Index(index));
        self
    }

    pub(crate) fn into_public(self) -> SerdeError {
        let Inner { message, path } = *self.0;
        let mut p = String::new();
        for (i, seg) in path.iter().rev().enumerate() {
            match seg {
                Seg::Key(k) if is_identifier(k) => {
                    if i > 0 {
                        p.push('.');
                    }
                    p.push_str(k);
                }
                Seg::Key(k) => {
                    if i == 0 {
                        p.push('$');
                    }
                    p.push_str(&format!("[{k:?}]"));
                }
                Seg::Index(n) => {
                    if i == 0 {
                        p.push('$');
                    }
                    p.push_str(&format!("[{n}]"));
                }
            }
        }
        if p.is_empty() {
            p.push('$');
        }
        SerdeError { path: p, message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for Error {}

impl serde::ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::msg(msg.to_string())
    }
}

impl serde::de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::msg(msg.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let e = Error::msg("m").at_key("qty").at_index(3).at_key("orders");
        assert_eq!(e.into_public().to_string(), "at orders[3].qty: m");
        let e = Error::msg("m").at_index(2);
        assert_eq!(e.into_public().path, "$[2]");
        let e = Error::msg("m").at_key("a b").at_key("prices");
        assert_eq!(e.into_public().path, "prices[\"a b\"]");
        assert_eq!(Error::msg("m").into_public().path, "$");
    }
}
