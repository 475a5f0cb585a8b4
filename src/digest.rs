//! Content digests: how qscore names the exact bytes of a calibration, a predictions file or a
//! manifest, so a figure or a score can always be traced to what produced it.

use sha2::{Digest, Sha256};

/// SHA-256 of `bytes`, lowercase hex (64 characters).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// `bytes` as lowercase hex, two characters per byte.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
