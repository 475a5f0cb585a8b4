//! API keys: `Authorization: Bearer KEY` (or basic auth with the key as password, for Label
//! Studio) on the scoring routes, checked in constant time, reloaded from
//! their file on SIGHUP and when the file changes, without a restart.
//!
//! Keys are kept only as SHA-256 digests and a presented key is compared, digest to digest,
//! with every stored one using `subtle`'s constant-time equality: neither the length nor the
//! content of a valid key leaks through timing. A reload that fails (file gone, empty) keeps the
//! keys in force and says so in the log, so a half-written file never locks everyone out.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use axum::{
    extract::{Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::Response,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::Error;

/// How often the key file's modification time is looked at.
const POLL: Duration = Duration::from_secs(1);

/// The keys in force and where they come from.
pub struct ApiKeys {
    path: PathBuf,
    state: RwLock<KeySet>,
}

struct KeySet {
    digests: Vec<[u8; 32]>,
    modified: Option<SystemTime>,
}

impl ApiKeys {
    /// Reads the key file: one key per line; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let set = read(path)?;
        tracing::info!(keys = set.digests.len(), file = %path.display(), "API keys loaded");
        Ok(Arc::new(Self { path: path.to_owned(), state: RwLock::new(set) }))
    }

    /// Keys from a key file's text, for checking headers without a file (tests, fuzzing); such
    /// a set is never reloaded.
    pub fn from_text(text: &str) -> Arc<Self> {
        Arc::new(Self {
            path: PathBuf::new(),
            state: RwLock::new(KeySet { digests: parse_keys(text), modified: None }),
        })
    }

    /// Re-reads the file; on failure the keys in force stay. Returns how many keys are now in force.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let set = read(&self.path)?;
        let n = set.digests.len();
        *self.state.write().expect("key lock") = set;
        Ok(n)
    }

    /// Whether `authorization` (the header's value) carries a valid key.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Error> {
        let key = authorization
            .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned).or_else(|| basic_password(v)))
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Error::Unauthorized("send the API key as `Authorization: Bearer KEY`".into()))?;
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let state = self.state.read().expect("key lock");
        let valid = state.digests.iter().fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&presented));
        if bool::from(valid) { Ok(()) } else { Err(Error::Unauthorized("the API key is not valid".into())) }
    }

    /// Reloads on SIGHUP and whenever the file's modification time changes, until the process
    /// ends.
    pub fn watch(self: &Arc<Self>) {
        let keys = Arc::clone(self);
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL);
            loop {
                let why = tokio::select! {
                    _ = async { match hup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => "SIGHUP",
                    _ = tick.tick() => {
                        let now = modified(&keys.path);
                        if now.is_none() || now == keys.state.read().expect("key lock").modified { continue; }
                        "file changed"
                    }
                };
                match keys.reload() {
                    Ok(n) => tracing::info!(keys = n, reason = why, "API keys reloaded"),
                    Err(e) => tracing::warn!(reason = why, "API keys not reloaded, the previous ones stay: {e:#}"),
                }
            }
        });
    }
}

/// The password of `Basic base64(user:password)`: Label Studio can only send basic auth to an
/// ML backend, so the key travels as the password there.
fn basic_password(header: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(header.strip_prefix("Basic ")?.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split_once(':').map(|(_, password)| password.to_owned())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Largest API keys file read, in bytes: far beyond any real list of keys, and it keeps a
/// mistaken path (a log, a device) from being read whole.
const MAX_KEYS_FILE_BYTES: u64 = 1 << 20;

fn read(path: &Path) -> anyhow::Result<KeySet> {
    use std::io::Read;
    let modified = modified(path);
    let cannot =
        |e: std::io::Error| anyhow::anyhow!("cannot read the API keys file {} (--api-keys-file): {e}", path.display());
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_KEYS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_KEYS_FILE_BYTES {
        anyhow::bail!(
            "the API keys file {} is over {MAX_KEYS_FILE_BYTES} bytes; it should hold one key per line",
            path.display()
        );
    }
    let digests = parse_keys(&text);
    if digests.is_empty() {
        anyhow::bail!("the API keys file {} holds no key (one per line)", path.display());
    }
    Ok(KeySet { digests, modified })
}

/// The SHA-256 digests of the keys in a key file's text: one key per line, blank lines and
/// `#` comments skipped, surrounding whitespace trimmed.
pub fn parse_keys(text: &str) -> Vec<[u8; 32]> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|k| Sha256::digest(k.as_bytes()).into())
        .collect()
}

/// Middleware: refuses a request without a valid key when keys are configured.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Result<Response, Error> {
    if let Some(keys) = &state.api_keys {
        keys.check(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_reloaded() {
        let path = std::env::temp_dir().join(format!("qscore-keys-{}", std::process::id()));
        std::fs::write(&path, "# ops team\nalpha-123\n\n  beta-456  \n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert!(keys.check(Some("Bearer alpha-123")).is_ok());
        assert!(keys.check(Some("Bearer beta-456")).is_ok());
        assert!(matches!(keys.check(Some("Bearer alpha-12")), Err(Error::Unauthorized(_))));
        assert!(keys.check(Some("alpha-123")).is_err(), "the Bearer scheme is required");
        assert!(keys.check(None).is_err());
        assert!(keys.check(Some("Bearer ")).is_err());
        // "labelstudio:alpha-123" in base64, as Label Studio's basic auth sends it.
        assert!(keys.check(Some("Basic bGFiZWxzdHVkaW86YWxwaGEtMTIz")).is_ok());
        assert!(keys.check(Some("Basic bGFiZWxzdHVkaW86bm9wZQ==")).is_err());

        std::fs::write(&path, "gamma-789\n").unwrap();
        assert_eq!(keys.reload().unwrap(), 1);
        assert!(keys.check(Some("Bearer alpha-123")).is_err());
        assert!(keys.check(Some("Bearer gamma-789")).is_ok());

        std::fs::write(&path, "\n# nothing\n").unwrap();
        assert!(keys.reload().is_err());
        assert!(keys.check(Some("Bearer gamma-789")).is_ok(), "a bad reload keeps the keys in force");
        std::fs::remove_file(&path).unwrap();
    }
}
