//! The worker's first frame.
//!
//! ```text
//! HELLO body = magic:"KAMEO\0" version:u16le worker_id:u32le pid:u32le secret_len:u8 secret
//! ```
//! The magic comes first and the version right after it, at fixed offsets, so that any later
//! version can still read them and report a mismatch instead of misparsing the rest.

use std::fmt;

pub const MAGIC: &[u8; 6] = b"KAMEO\0";
pub const MAX_SECRET: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub worker_id: u32,
    pub pid: u32,
    pub secret: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloError {
    /// Not a kameo peer at all.
    BadMagic,
    /// A kameo peer speaking another protocol version.
    Version { theirs: u16, ours: u16 },
    /// Right magic and version, but the rest is malformed.
    Malformed,
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::BadMagic => write!(f, "the peer is not a kameo worker (bad handshake magic)"),
            HelloError::Version { theirs, ours } => write!(
                f,
                "protocol version mismatch: the worker speaks version {theirs}, this parent speaks version {ours}; \
                 install the same kameo version in the worker's interpreter"
            ),
            HelloError::Malformed => write!(f, "malformed handshake"),
        }
    }
}

impl std::error::Error for HelloError {}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.secret.len() <= MAX_SECRET);
        let mut b = Vec::with_capacity(MAGIC.len() + 11 + self.secret.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.worker_id.to_le_bytes());
        b.extend_from_slice(&self.pid.to_le_bytes());
        b.push(self.secret.len() as u8);
        b.extend_from_slice(&self.secret);
        b
    }

    /// Decode and check the version against `ours`.
    pub fn decode(b: &[u8], ours: u16) -> Result<Hello, HelloError> {
        if b.len() < MAGIC.len() + 2 || &b[..MAGIC.len()] != MAGIC {
            return Err(HelloError::BadMagic);
        }
        let m = MAGIC.len();
        let version = u16::from_le_bytes([b[m], b[m + 1]]);
        if version != ours {
            return Err(HelloError::Version {
                theirs: version,
                ours,
            });
        }
        let rest = &b[m + 2..];
        if rest.len() < 9 {
            return Err(HelloError::Malformed);
        }
        let worker_id = u32::from_le_bytes(rest[0..4].try_into().expect("4"));
        let pid = u32::from_le_bytes(rest[4..8].try_into().expect("4"));
        let sl = rest[8] as usize;
        if sl > MAX_SECRET || rest.len() != 9 + sl {
            return Err(HelloError::Malformed);
        }
        Ok(Hello {
            version,
            worker_id,
            pid,
            secret: rest[9..].to_vec(),
        })
    }
}

/// Compare secrets in time independent of where they differ.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: 1,
            worker_id: 3,
            pid: 4242,
            secret: vec![7; 32],
        }
    }

    #[test]
    fn round_trip() {
        assert_eq!(Hello::decode(&hello().encode(), 1), Ok(hello()));
    }

    #[test]
    fn version_mismatch_is_named() {
        let err = Hello::decode(&hello().encode(), 2).unwrap_err();
        assert_eq!(err, HelloError::Version { theirs: 1, ours: 2 });
        assert!(err.to_string().contains("version 1") && err.to_string().contains("version 2"));
    }

    #[test]
    fn garbage_is_not_a_worker() {
        assert_eq!(
            Hello::decode(b"GET / HTTP/1.1\r\n", 1),
            Err(HelloError::BadMagic)
        );
        assert_eq!(Hello::decode(b"", 1), Err(HelloError::BadMagic));
        let mut h = hello().encode();
        h.pop();
        assert_eq!(Hello::decode(&h, 1), Err(HelloError::Malformed));
        for cut in 0..h.len() {
            let _ = Hello::decode(&h[..cut], 1);
        }
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"ab"));
    }
}
