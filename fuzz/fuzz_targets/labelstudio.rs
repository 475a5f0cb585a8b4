//! The Label Studio ML backend's client input: `parse_predict` (the `/predict` body) and
//! `LabelStudio::resolve` (task image references, which decide which URLs qscore fetches).
//!
//! Input: the whole input is a `/predict` body; it is also split at its first NUL byte into two
//! references, each resolved as lossy UTF-8, and every task image of a body that parses is
//! resolved too.
//!
//! Properties: no panic; a parsed request has at most `max_tasks` tasks; every URL `resolve`
//! accepts is `http` on `ls.local`, port 8080 (the configured Label Studio), whatever the
//! reference says: an SSRF guard.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use qscore::http::labelstudio::{LabelStudio, parse_predict};

const MAX_TASKS: usize = 16;

static LS: LazyLock<LabelStudio> = LazyLock::new(|| {
    LabelStudio::new("http://ls.local:8080", None, Duration::from_secs(1), 1 << 20).expect("a valid base URL")
});

fn check_resolve(reference: &str) {
    if let Ok(url) = LS.resolve(reference) {
        assert_eq!(url.scheme(), "http", "{reference:?} resolved to {url}");
        assert_eq!(url.host_str(), Some("ls.local"), "{reference:?} resolved to {url}");
        assert_eq!(url.port_or_known_default(), Some(8080), "{reference:?} resolved to {url}");
        assert!(url.username().is_empty() && url.password().is_none(), "{reference:?} resolved to {url}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_predict(data, MAX_TASKS) {
        assert!(req.tasks.len() <= MAX_TASKS, "{} tasks past max_tasks {MAX_TASKS}", req.tasks.len());
        for task in &req.tasks {
            if let Some(image) = &task.data.image {
                check_resolve(image);
            }
        }
    }
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    check_resolve(&String::from_utf8_lossy(&data[..split]));
    check_resolve(&String::from_utf8_lossy(data.get(split + 1..).unwrap_or(&[])));
});
