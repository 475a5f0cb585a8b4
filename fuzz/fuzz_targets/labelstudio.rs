//! The Label Studio ML backend's client input: `parse_predict` (the `/predict` body),
//! `image_fields` (the label config XML, which names the task's image fields) and
//! `LabelStudio::resolve` (task image references, which decide which URLs qscore fetches, and
//! where the token goes).
//!
//! Input: the whole input is a `/predict` body; it is also split at its first NUL byte: the part
//! before is parsed as a label config and resolved as a reference, the part after resolved as a
//! reference (lossy UTF-8). Every task image of a body that parses, as its label config names
//! them, is resolved too.
//!
//! Properties: no panic; a parsed request has at most `max_tasks` tasks; a label config yields
//! plain variable names; every URL `resolve` accepts is `http` on `ls.local`, port 8080 (the
//! configured Label Studio), without credentials, on one of its media paths, whatever the
//! reference says: an SSRF and token-leak guard.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use qscore::http::labelstudio::{LabelStudio, image_fields, parse_predict};

const MAX_TASKS: usize = 16;

static LS: LazyLock<LabelStudio> = LazyLock::new(|| {
    LabelStudio::new("http://ls.local:8080", None, Duration::from_secs(1), 1 << 20).expect("a valid base URL")
});

/// The paths the token may be sent to.
const MEDIA: [&str; 5] = ["/data/upload/", "/data/local-files/", "/storage-data/uploaded/", "/tasks/", "/projects/"];

fn check_resolve(reference: &str, task: &str) {
    if let Ok(url) = LS.resolve(reference, task) {
        assert_eq!(url.scheme(), "http", "{reference:?} resolved to {url}");
        assert_eq!(url.host_str(), Some("ls.local"), "{reference:?} resolved to {url}");
        assert_eq!(url.port_or_known_default(), Some(8080), "{reference:?} resolved to {url}");
        assert!(url.username().is_empty() && url.password().is_none(), "{reference:?} resolved to {url}");
        assert!(MEDIA.iter().any(|m| url.path().starts_with(m)), "{reference:?} resolved to {url}");
        assert!(!url.path().split('/').any(|s| s == ".." || s == "."), "{reference:?} resolved to {url}");
    }
}

fn check_config(config: &str) {
    if let Ok(fields) = image_fields(config) {
        for f in &fields {
            assert!(!f.key().is_empty() && !f.key().contains(['$', '/', '.', ' ']), "{config:?} gave {f:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_predict(data, MAX_TASKS) {
        assert!(req.tasks.len() <= MAX_TASKS, "{} tasks past max_tasks {MAX_TASKS}", req.tasks.len());
        let fields = req.label_config.as_deref().and_then(|c| image_fields(c).ok());
        for task in &req.tasks {
            for image in task.data.images(fields.as_deref()).unwrap_or_default() {
                check_resolve(image, &task.id.0);
            }
        }
    }
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let first = String::from_utf8_lossy(&data[..split]);
    check_config(&first);
    check_resolve(&first, "1");
    check_resolve(&String::from_utf8_lossy(data.get(split + 1..).unwrap_or(&[])), "1");
});
