//! `qscore::http::auth::ApiKeys`: the key file's text (`from_text`) and the `Authorization`
//! header (`check`), as `Bearer KEY` or `Basic base64(user:KEY)`.
//!
//! Input: byte 0 picks how the header is built (0 `Bearer ` + part, 1 `Basic ` +
//! base64(part), 2 `Basic ` + part, 3 part alone); the rest splits at its first NUL byte into
//! the key file's text and that part (both lossy UTF-8, except that mode 1 encodes the raw bytes).
//!
//! Properties: no panic; `from_text` refuses exactly a text with a key line holding a
//! character outside printable ASCII; and `check` accepts exactly when the presented key
//! (trimmed, non-empty) equals one of the file's keys (lines trimmed, blank and `#` lines
//! skipped).
#![no_main]

use base64::{Engine, engine::general_purpose::STANDARD};
use libfuzzer_sys::fuzz_target;
use qscore::http::auth::ApiKeys;

/// The key a header presents, as the documented format says: the scheme in any case, then
/// spaces or tabs.
fn presented(header: &str) -> Option<String> {
    let (scheme, credentials) = header.trim().split_once([' ', '\t'])?;
    let key = if scheme.eq_ignore_ascii_case("bearer") {
        credentials.to_owned()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let raw = STANDARD.decode(credentials.trim()).ok()?;
        String::from_utf8(raw).ok()?.split_once(':')?.1.to_owned()
    } else {
        return None;
    };
    Some(key.trim().to_owned()).filter(|k| !k.is_empty())
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else { return };
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let text = String::from_utf8_lossy(&rest[..split]);
    let part = rest.get(split + 1..).unwrap_or(&[]);
    let lossy = String::from_utf8_lossy(part);
    let header = match choice & 3 {
        0 => format!("Bearer {lossy}"),
        1 => format!("Basic {}", STANDARD.encode(part)),
        2 => format!("Basic {lossy}"),
        _ => lossy.into_owned(),
    };
    let is_key = |l: &str| !l.is_empty() && !l.starts_with('#');
    let Ok(keys) = ApiKeys::from_text(&text) else {
        // Refused exactly when a key line holds a character a header cannot carry.
        assert!(text.lines().map(str::trim).any(|l| is_key(l) && l.chars().any(|c| !matches!(c, ' '..='~'))));
        return;
    };
    let accepted = keys.check(Some(&header)).is_ok();
    let expected = presented(&header)
        .is_some_and(|k| text.lines().map(str::trim).any(|l| is_key(l) && l == k));
    assert_eq!(accepted, expected, "key file {text:?}, header {header:?}");
    assert!(keys.check(None).is_err(), "no header must be refused");
});
