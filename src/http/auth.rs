//! API keys: `Authorization: Bearer KEY` (or basic auth with the key as password, for Label
//! Studio) on the scoring routes, checked in constant time, reloaded from
//! their file on SIGHUP and when the file changes, without a restart.
//!
//! Keys are kept only as SHA-256 digests and a presented key is compared, digest to digest,
//! with every stored one using `subtle`'s constant-time equality: neither the length nor the
//! content of a valid key leaks through timing.
//!
//! A rewrite of the file never locks out a key that is in both the old and the new file: the
//! watcher applies a changed file only once it reads the same on two polls in a row, and the
//! keys in force before stay valid for [`GRACE`] after that (and while the file keeps
//! changing), so a file caught half-written (an editor that truncates then writes, a writer
//! that stalls) only ever adds keys for a moment. A file that cannot be applied (gone, empty,
//! a line that cannot be a key) keeps the keys in force and says so in the log. SIGHUP applies
//! the file at once, with no grace: the way to revoke a key immediately.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
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

/// How often the key file is read while watched.
pub const POLL: Duration = Duration::from_millis(250);

/// How long the keys in force before a rewrite of the file stay valid after it is applied.
pub const GRACE: Duration = Duration::from_secs(10);

/// The keys in force and where they come from.
pub struct ApiKeys {
    path: PathBuf,
    grace: Duration,
    state: RwLock<KeySet>,
}

/// A key file's contents as last read: what decides whether it changed between two polls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    digest: [u8; 32],
}

struct KeySet {
    /// The keys of the file last applied.
    current: Vec<[u8; 32]>,
    /// The keys in force before the last change the watcher applied, valid until the instant.
    previous: Option<(Vec<[u8; 32]>, Instant)>,
    /// The file as read at the last poll; `None` when it could not be read.
    seen: Option<Stamp>,
    /// The file last applied or refused, so that a refused file is reported once.
    considered: Option<Stamp>,
}

/// What one look at the key file did.
#[derive(Debug)]
pub enum Poll {
    /// The file is what was last applied (or refused).
    Unchanged,
    /// The file changed since the last poll (or cannot be read): it is read again at the next.
    Settling,
    /// The file read the same on two polls in a row and its keys are in force; the previous
    /// ones stay valid for [`GRACE`]. Holds the number of keys.
    Applied(usize),
    /// The file read the same on two polls in a row but is not a valid key file; the keys in
    /// force stay.
    Refused(anyhow::Error),
}

impl ApiKeys {
    /// Reads the key file: one key per line; blank lines and `#` comments are skipped. A line
    /// that cannot be a key (non-ASCII or control characters) fails the load, naming the line.
    pub fn load(path: &Path) -> anyhow::Result<Arc<Self>> {
        let (digests, stamp) = read(path)?;
        tracing::info!(keys = digests.len(), file = %path.display(), "API keys loaded");
        let state = KeySet { current: digests, previous: None, seen: Some(stamp.clone()), considered: Some(stamp) };
        Ok(Arc::new(Self { path: path.to_owned(), grace: GRACE, state: RwLock::new(state) }))
    }

    /// Keys from a key file's text, for checking headers without a file (tests, fuzzing); such
    /// a set is never reloaded.
    pub fn from_text(text: &str) -> anyhow::Result<Arc<Self>> {
        let state = KeySet { current: parse_keys(text)?, previous: None, seen: None, considered: None };
        Ok(Arc::new(Self { path: PathBuf::new(), grace: GRACE, state: RwLock::new(state) }))
    }

    /// Re-reads the file and applies it at once (SIGHUP: the operator says the file is
    /// complete): the previous keys stop at once too. On failure the keys in force stay.
    /// Returns how many keys are now in force.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let read = read(&self.path);
        let mut state = self.state.write().expect("key lock");
        let (digests, stamp) = read?;
        let n = digests.len();
        *state = KeySet { current: digests, previous: None, seen: Some(stamp.clone()), considered: Some(stamp) };
        Ok(n)
    }

    /// One look at the file, as the watcher takes every [`POLL`]: a changed file is applied
    /// only once it reads the same (size, modification time, SHA-256) on two polls in a row,
    /// and the keys in force before stay valid for the grace time after that, so a file being
    /// rewritten (truncated then written, written in pieces, renamed over) never takes away a
    /// key that is in both the old and the new file.
    pub fn poll(&self) -> Poll {
        let read = read_file(&self.path);
        let mut state = self.state.write().expect("key lock");
        let Ok((text, stamp)) = read else {
            state.seen = None;
            return Poll::Settling;
        };
        if state.considered.as_ref() == Some(&stamp) {
            state.seen = Some(stamp);
            return Poll::Unchanged;
        }
        if state.seen.as_ref() != Some(&stamp) {
            state.seen = Some(stamp);
            return Poll::Settling;
        }
        state.considered = Some(stamp);
        let digests = match parse_keys(&text).and_then(|d| nonempty(&self.path, d)) {
            Ok(d) => d,
            Err(e) => return Poll::Refused(e),
        };
        let n = digests.len();
        let now = Instant::now();
        // The keys that were valid a moment ago stay valid: those of the file replaced, and
        // those still in their own grace time (a rewrite seen in several steps).
        let mut before = std::mem::replace(&mut state.current, digests);
        if let Some((older, until)) = state.previous.take()
            && until > now
        {
            before.extend(older);
        }
        state.previous = Some((before, now + self.grace));
        Poll::Applied(n)
    }

    /// Whether `authorization` (the header's value) carries a valid key.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Error> {
        let key = authorization
            .and_then(presented_key)
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Error::Unauthorized("send the API key as `Authorization: Bearer KEY`".into()))?;
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let state = self.state.read().expect("key lock");
        let previous = match &state.previous {
            Some((digests, until)) if *until > Instant::now() => digests.as_slice(),
            _ => &[],
        };
        let valid =
            state.current.iter().chain(previous).fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&presented));
        if bool::from(valid) { Ok(()) } else { Err(Error::Unauthorized("the API key is not valid".into())) }
    }

    /// Reloads at once on SIGHUP, and polls the file every [`POLL`] (see [`Self::poll`]), until
    /// the process ends.
    pub fn watch(self: &Arc<Self>) {
        let keys = Arc::clone(self);
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL);
            loop {
                tokio::select! {
                    _ = async { match hup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                        match keys.reload() {
                            Ok(n) => tracing::info!(keys = n, reason = "SIGHUP", "API keys reloaded"),
                            Err(e) => tracing::warn!(reason = "SIGHUP", "API keys not reloaded, the previous ones stay: {e:#}"),
                        }
                    }
                    _ = tick.tick() => match keys.poll() {
                        Poll::Applied(n) => tracing::info!(
                            keys = n, reason = "file changed", grace_s = keys.grace.as_secs(),
                            "API keys reloaded; the previous ones stay valid for the grace time"
                        ),
                        Poll::Refused(e) => tracing::warn!(reason = "file changed", "API keys not reloaded, the previous ones stay: {e:#}"),
                        Poll::Unchanged | Poll::Settling => {}
                    },
                }
            }
        });
    }
}

/// The key of an `Authorization` value: `Bearer KEY`, or the password of `Basic
/// base64(user:KEY)` (Label Studio can only send basic auth to an ML backend). The scheme is
/// case-insensitive (RFC 9110 §11.1) and any run of spaces may follow it.
fn presented_key(header: &str) -> Option<String> {
    let (scheme, credentials) = header.trim().split_once([' ', '\t'])?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.to_owned())
    } else if scheme.eq_ignore_ascii_case("basic") {
        basic_password(credentials)
    } else {
        None
    }
}

fn basic_password(credentials: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(credentials).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split_once(':').map(|(_, password)| password.to_owned())
}

/// Largest API keys file read, in bytes: far beyond any real list of keys, and it keeps a
/// mistaken path (a log, a device) from being read whole.
const MAX_KEYS_FILE_BYTES: u64 = 1 << 20;

/// The file's text and its stamp.
fn read_file(path: &Path) -> anyhow::Result<(String, Stamp)> {
    use std::io::Read;
    let cannot =
        |e: std::io::Error| anyhow::anyhow!("cannot read the API keys file {} (--api-keys-file): {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    let mut raw = Vec::new();
    file.by_ref().take(MAX_KEYS_FILE_BYTES + 1).read_to_end(&mut raw).map_err(cannot)?;
    if raw.len() as u64 > MAX_KEYS_FILE_BYTES {
        anyhow::bail!(
            "the API keys file {} is over {MAX_KEYS_FILE_BYTES} bytes; it should hold one key per line",
            path.display()
        );
    }
    let stamp = Stamp { len: raw.len() as u64, modified: meta.modified().ok(), digest: Sha256::digest(&raw).into() };
    let text = String::from_utf8(raw).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        anyhow::anyhow!(
            "the API keys file {} is not UTF-8 text (line {line}); keys are printable ASCII",
            path.display()
        )
    })?;
    Ok((text, stamp))
}

fn read(path: &Path) -> anyhow::Result<(Vec<[u8; 32]>, Stamp)> {
    let (text, stamp) = read_file(path)?;
    let digests = parse_keys(&text).map_err(|e| anyhow::anyhow!("the API keys file {}: {e}", path.display()))?;
    Ok((nonempty(path, digests)?, stamp))
}

fn nonempty(path: &Path, digests: Vec<[u8; 32]>) -> anyhow::Result<Vec<[u8; 32]>> {
    if digests.is_empty() {
        anyhow::bail!("the API keys file {} holds no key (one per line)", path.display());
    }
    Ok(digests)
}

/// The SHA-256 digests of the keys in a key file's text: one key per line, blank lines and
/// `#` comments skipped, surrounding whitespace trimmed. A key is printable ASCII (what an
/// `Authorization` header can carry); any other character fails the whole text, naming the
/// line, since such a key could never match.
pub fn parse_keys(text: &str) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut digests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        if let Some(c) = key.chars().find(|c| !matches!(c, ' '..='~')) {
            anyhow::bail!(
                "line {} holds {c:?}, which an Authorization header cannot carry; keys are printable ASCII",
                i + 1
            );
        }
        digests.push(Sha256::digest(key.as_bytes()).into());
    }
    Ok(digests)
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("qscore-keys-{name}-{}", std::process::id()))
    }

    #[test]
    fn keys_are_checked_and_reloaded() {
        let path = temp("reload");
        std::fs::write(&path, "# ops team\nalpha-123\n\n  beta-456  \n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert!(keys.check(Some("Bearer alpha-123")).is_ok());
        assert!(keys.check(Some("Bearer beta-456")).is_ok());
        assert!(matches!(keys.check(Some("Bearer alpha-12")), Err(Error::Unauthorized(_))));
        assert!(keys.check(Some("alpha-123")).is_err(), "the Bearer scheme is required");
        assert!(keys.check(Some("Token alpha-123")).is_err());
        assert!(keys.check(Some("Beareralpha-123")).is_err());
        assert!(keys.check(None).is_err());
        assert!(keys.check(Some("Bearer ")).is_err());
        // "labelstudio:alpha-123" in base64, as Label Studio's basic auth sends it.
        assert!(keys.check(Some("Basic bGFiZWxzdHVkaW86YWxwaGEtMTIz")).is_ok());
        assert!(keys.check(Some("Basic bGFiZWxzdHVkaW86bm9wZQ==")).is_err());

        std::fs::write(&path, "gamma-789\n").unwrap();
        assert_eq!(keys.reload().unwrap(), 1);
        assert!(keys.check(Some("Bearer alpha-123")).is_err(), "SIGHUP applies at once, with no grace");
        assert!(keys.check(Some("Bearer gamma-789")).is_ok());

        std::fs::write(&path, "\n# nothing\n").unwrap();
        assert!(keys.reload().is_err());
        assert!(keys.check(Some("Bearer gamma-789")).is_ok(), "a bad reload keeps the keys in force");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn auth_scheme_is_case_insensitive() {
        let keys = ApiKeys::from_text("alpha-123\n").unwrap();
        for header in [
            "bearer alpha-123",
            "BEARER alpha-123",
            "BeArEr alpha-123",
            "Bearer    alpha-123",
            "bearer \t alpha-123 ",
            "basic bGFiZWxzdHVkaW86YWxwaGEtMTIz",
            "BASIC   bGFiZWxzdHVkaW86YWxwaGEtMTIz",
        ] {
            assert!(keys.check(Some(header)).is_ok(), "{header:?} should be accepted");
        }
    }

    #[test]
    fn a_line_that_cannot_be_a_key_is_refused_at_load_and_reload() {
        let path = temp("ascii");
        for (text, line) in [("ok-1\nclé-2\n", 2), ("# c\n\nok\nbad\u{7}key\n", 4), ("a\u{0}b\n", 1)] {
            std::fs::write(&path, text).unwrap();
            let e = ApiKeys::load(&path).err().expect("refused").to_string();
            assert!(e.contains(&format!("line {line}")), "{e}");
        }
        std::fs::write(&path, b"ok\n\xff\xfe\n").unwrap();
        assert!(ApiKeys::load(&path).err().unwrap().to_string().contains("line 2"));

        std::fs::write(&path, "alpha-123\n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        std::fs::write(&path, "beta-456\nünïcode\n").unwrap();
        assert!(keys.reload().unwrap_err().to_string().contains("line 2"));
        assert!(matches!(keys.poll(), Poll::Settling));
        assert!(matches!(keys.poll(), Poll::Refused(_)));
        assert!(matches!(keys.poll(), Poll::Unchanged), "a refused file is reported once");
        assert!(keys.check(Some("Bearer alpha-123")).is_ok(), "the old keys stay");
        assert!(keys.check(Some("Bearer beta-456")).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    /// A writer rewrites the key file slowly, in pieces (truncate, then a few bytes at a time,
    /// with one stall longer than two polls), and alternately by write-then-rename, while a
    /// client checks a key that is in both the old and the new file every millisecond.
    #[test]
    fn a_rewrite_never_locks_out_a_key_in_both_files() {
        let path = temp("rewrite");
        let old = "# old\nshared-key-0001\nold-only-key\n";
        let new = "# new\nnew-only-key\nshared-key-0001\n";
        std::fs::write(&path, old).unwrap();
        let mut keys = ApiKeys::load(&path).unwrap();
        Arc::get_mut(&mut keys).unwrap().grace = Duration::from_secs(3);
        let done = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicUsize::new(0));
        let checks = Arc::new(AtomicUsize::new(0));
        let poller = {
            let (keys, done) = (Arc::clone(&keys), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    keys.poll();
                    std::thread::sleep(POLL);
                }
            })
        };
        let client = {
            let (keys, done, refused, checks) =
                (Arc::clone(&keys), Arc::clone(&done), Arc::clone(&refused), Arc::clone(&checks));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if keys.check(Some("Bearer shared-key-0001")).is_err() {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    checks.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let slow_rewrite = |text: &str, stall_at: usize| {
            use std::io::Write;
            let mut f = std::fs::File::create(&path).unwrap(); // truncates
            for (i, piece) in text.as_bytes().chunks(4).enumerate() {
                f.write_all(piece).unwrap();
                f.flush().unwrap();
                std::thread::sleep(if i == stall_at { POLL * 3 } else { Duration::from_millis(40) });
            }
        };
        slow_rewrite(new, 5); // stalls in the middle of the shared key
        std::thread::sleep(POLL * 3);
        slow_rewrite(old, 1); // and back, stalling in the comment
        std::thread::sleep(POLL * 3);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, new).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        std::thread::sleep(POLL * 3);
        assert!(keys.check(Some("Bearer new-only-key")).is_ok(), "the complete new file is applied");
        assert!(keys.check(Some("Bearer old-only-key")).is_ok(), "the old keys are in their grace time");
        std::thread::sleep(Duration::from_secs(3));
        done.store(true, Ordering::Relaxed);
        client.join().unwrap();
        poller.join().unwrap();
        assert!(checks.load(Ordering::Relaxed) > 1000);
        assert_eq!(refused.load(Ordering::Relaxed), 0, "the shared key was refused during a rewrite");
        assert!(keys.check(Some("Bearer old-only-key")).is_err(), "a removed key ends with the grace time");
        assert!(keys.check(Some("Bearer shared-key-0001")).is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
