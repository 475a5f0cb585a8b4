//! `qscore::http::auth::ApiKeys`: the key file's text (`from_text`) and the `Authorization`
//! header (`check`), as `Bearer KEY` or `Basic base64(user:KEY)`.
//!
//! Input: byte 0 picks how the header is built (0 `Bearer ` + part, 1 `Basic ` +
//! base64(part), 2 `Basic ` + part, 3 part alone); the rest splits at its first NUL byte into
//! the key file's text and that part (both lossy UTF-8, except that mode 1 encodes the raw bytes).
//!
//! Properties: no panic, and `check` accepts exactly when the presented key (trimmed,
//! non-empty) equals one of the file's keys (lines trimmed, blank and `#` lines skipped).
#![no_main]

use base64::{Engine, engine::general_purpose::STANDARD};
use libfuzzer_sys::fuzz_target;
use qscore::http::auth::ApiKeys;

/// The key a header presents, as the documented format says.
fn presented(header: &str) -> Option<String> {
    let key = if let Some(k) = header.strip_prefix("Bearer ") {
        k.to_owned()
    } else {
        let raw = STANDARD.decode(header.strip_prefix("Basic ")?.trim()).ok()?;
        String::from_utf8(raw).ok()?.split_once(':')?.1.to_owned()
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
    let keys = ApiKeys::from_text(&text);
    let accepted = keys.check(Some(&header)).is_ok();
    let expected = presented(&header)
        .is_some_and(|k| text.lines().map(str::trim).any(|l| !l.is_empty() && !l.starts_with('#') && l == k));
    assert_eq!(accepted, expected, "key file {text:?}, header {header:?}");
    assert!(keys.check(None).is_err(), "no header must be refused");
});
