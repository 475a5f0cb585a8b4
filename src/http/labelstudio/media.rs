//! Fetching task images, and nothing else: what a reference in a task's data may point at, and
//! where the Label Studio token may go.
//!
//! - `data:image/...;base64,...`: decoded in place, within the size limit; nothing is fetched.
//! - A path or URL on the `--label-studio-url` origin: fetched with the token only when its
//!   normalised path is one Label Studio serves media on ([`MEDIA_PATHS`]); any other path (the
//!   API, the admin pages) is refused without a request, so a task can neither use the token
//!   nor learn anything from Label Studio's answer.
//! - `s3://`, `gs://`, `azure-blob://` (Label Studio's cloud storages): asked of Label Studio's
//!   `/tasks/{id}/presign/?fileuri=<urlsafe base64 of the URI>`, with the token. Label Studio
//!   answers with the bytes or redirects to the storage; a redirect is followed only to a host of
//!   `--label-studio-storage-hosts`, by a fresh request without the token, at most
//!   [`MAX_REDIRECTS`] hops, each checked.
//!
//! Every fetch has the size limit, the budget's reservation and the request's deadline.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;

use super::label_config::ImageField;
use crate::{
    engine::budget::{HeldBuffer, MemoryBudget, Reservation},
    error::Error,
    fetch::{self, shown},
};

/// The paths, below the Label Studio base URL, that the token is sent to: uploads, local files,
/// the storage proxy, and the cloud storage resolvers.
pub const MEDIA_PATHS: &str = "/data/upload/..., /data/local-files/?d=..., /storage-data/uploaded/?filepath=..., \
                               /tasks/{id}/presign/?fileuri=..., /tasks/{id}/resolve/?fileuri=..., \
                               /projects/{id}/presign/?fileuri=..., /projects/{id}/resolve/?fileuri=...";
/// Redirects followed from Label Studio towards a storage host.
pub const MAX_REDIRECTS: usize = 3;
/// Label Studio's cloud storage schemes (its `url_scheme`s: S3, GCS, Azure Blob).
pub const CLOUD_SCHEMES: [&str; 3] = ["s3://", "gs://", "azure-blob://"];
/// Projects whose label config `/setup` remembers.
const MAX_PROJECTS: usize = 256;

/// The storage hosts a presign redirect may lead to: exact names, or `*.suffix` for any name
/// below `suffix`.
#[derive(Debug, Clone, Default)]
pub struct StorageHosts(Vec<String>);

impl StorageHosts {
    /// Checks each pattern: a host name, an IP address, or `*.` and a domain.
    pub fn parse(patterns: &[String]) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for p in patterns.iter().map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()) {
            let name = p.strip_prefix("*.").unwrap_or(&p);
            let host_like = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
            if !host_like {
                anyhow::bail!(
                    "--label-studio-storage-hosts: `{p}` is not a host name or `*.domain` (no scheme, port or path)"
                );
            }
            out.push(p);
        }
        Ok(Self(out))
    }

    /// Whether a redirect to `url` may be followed.
    fn allows(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else { return false };
        self.0.iter().any(|p| match p.strip_prefix("*.") {
            Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => *p == host,
        })
    }
}

/// Where task images may come from, and the label configs `/setup` was told about.
#[derive(Debug)]
pub struct LabelStudio {
    /// The Label Studio base URL.
    pub base: reqwest::Url,
    /// Sent as `Authorization: Token ...`, only to [`MEDIA_PATHS`] on the base URL's origin.
    pub token: Option<String>,
    /// The HTTP client, with the fetch timeout; it follows no redirect by itself.
    pub client: reqwest::Client,
    /// Largest image fetched, in bytes.
    pub max_bytes: usize,
    /// Where presign redirects may lead.
    pub storage_hosts: StorageHosts,
    /// Image fields per project, from `/setup`, for `/predict` requests without a label config.
    configs: Mutex<HashMap<String, Arc<Vec<ImageField>>>>,
}

impl LabelStudio {
    /// A fetcher for `base`, with `timeout` per request.
    pub fn new(base: &str, token: Option<String>, timeout: Duration, max_bytes: usize) -> anyhow::Result<Self> {
        let base =
            reqwest::Url::parse(base).map_err(|e| anyhow::anyhow!("--label-studio-url {base} is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            anyhow::bail!("--label-studio-url must be an http(s) URL with a host, got {base}");
        }
        let client = reqwest::Client::builder().timeout(timeout).redirect(reqwest::redirect::Policy::none()).build()?;
        Ok(Self { base, token, client, max_bytes, storage_hosts: StorageHosts::default(), configs: Mutex::default() })
    }

    /// The same, following presign redirects to `hosts`.
    pub fn with_storage_hosts(self, hosts: StorageHosts) -> Self {
        Self { storage_hosts: hosts, ..self }
    }

    /// Remembers a project's image fields (from `/setup`); past [`MAX_PROJECTS`] projects, one
    /// already known is forgotten (that project's `/predict` still carries its `label_config`).
    pub fn remember(&self, project: String, fields: Vec<ImageField>) {
        let mut configs = self.configs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if configs.len() >= MAX_PROJECTS
            && !configs.contains_key(&project)
            && let Some(any) = configs.keys().next().cloned()
        {
            configs.remove(&any);
        }
        configs.insert(project, Arc::new(fields));
    }

    /// A project's image fields, when `/setup` told them.
    pub fn recall(&self, project: &str) -> Option<Arc<Vec<ImageField>>> {
        self.configs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(project).cloned()
    }

    fn base_path(&self) -> &str {
        self.base.path().trim_end_matches('/')
    }

    fn is_label_studio(&self, url: &reqwest::Url) -> bool {
        url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
    }

    /// The URL to fetch for task `task`'s image reference, or why it is refused.
    pub fn resolve(&self, reference: &str, task: &str) -> Result<reqwest::Url, Error> {
        // URL schemes are case-insensitive: `S3://` is `s3://`.
        if let Some(scheme) =
            CLOUD_SCHEMES.iter().find(|s| reference.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)))
        {
            return self.presign_url(&format!("{scheme}{}", &reference[scheme.len()..]), task);
        }
        // Behind a path prefix (`--label-studio-url http://host/label-studio`), Label Studio writes
        // upload paths with the prefix (`/label-studio/data/upload/...`) or, in older tasks,
        // without it; both resolve under the prefix.
        let prefix = self.base_path();
        let prefixed;
        let reference = if !prefix.is_empty()
            && reference.starts_with('/')
            && !reference.starts_with("//")
            && !reference.starts_with(&format!("{prefix}/"))
        {
            prefixed = format!("{prefix}{reference}");
            &prefixed
        } else {
            reference
        };
        let url =
            self.base.join(reference).map_err(|e| Error::UrlRefused(format!("`{reference}` is not a URL: {e}")))?;
        if !self.is_label_studio(&url) {
            return Err(Error::UrlRefused(format!(
                "refused to fetch {}: images are fetched only from the Label Studio host {} (--label-studio-url), \
                 or from cloud storage through its presign endpoint",
                shown(&url),
                self.base.origin().ascii_serialization()
            )));
        }
        self.check_media_path(&url)?;
        Ok(url)
    }

    /// Label Studio's resolver for a cloud storage URI, as its SDK builds it.
    fn presign_url(&self, uri: &str, task: &str) -> Result<reqwest::Url, Error> {
        // Digits only, and within u64: a float or an integer past u64 (read as a float) keeps
        // its `.` or exponent in the id, so it never becomes another task's number.
        if !task.bytes().all(|b| b.is_ascii_digit()) || task.parse::<u64>().is_err() {
            return Err(Error::UnresolvedImage(format!(
                "task id `{task}` is not a whole number from 0 to {}: a cloud storage URI is resolved through \
                 Label Studio's /tasks/{{id}}/presign/, which needs the task's own numeric id",
                u64::MAX
            )));
        }
        let fileuri = base64::engine::general_purpose::URL_SAFE.encode(uri);
        let mut url = self.base.clone();
        url.set_path(&format!("{}/tasks/{task}/presign/", self.base_path()));
        url.set_query(Some(&format!("fileuri={fileuri}")));
        Ok(url)
    }

    /// Refuses, without a request, any Label Studio path that is not one of [`MEDIA_PATHS`]
    /// once normalised (`..`, `%2e%2e`, backslashes resolved by the URL parser; encoded
    /// separators, empty segments and credentials refused outright).
    fn check_media_path(&self, url: &reqwest::Url) -> Result<(), Error> {
        let refuse = |why: &str| {
            Err(Error::UrlRefused(format!(
                "refused to fetch {} from Label Studio: {why}; the token is sent only to its media paths {MEDIA_PATHS}",
                url.path()
            )))
        };
        if !url.username().is_empty() || url.password().is_some() {
            return refuse("a URL with credentials");
        }
        let Some(rest) = url.path().strip_prefix(self.base_path()).filter(|r| r.starts_with('/')) else {
            return refuse("outside the --label-studio-url path");
        };
        let tricky = |s: &str| {
            let decoded = percent_encoding::percent_decode_str(s).decode_utf8_lossy();
            decoded.contains(['\\', '\0'])
                || decoded.contains("//")
                || decoded.split('/').any(|seg| seg == ".." || seg == ".")
                || s.to_ascii_lowercase().contains("%2f")
        };
        if tricky(rest) {
            return refuse("a path with dot segments, empty segments or encoded separators");
        }
        let query = |key: &str| url.query_pairs().find(|(k, _)| k == key).map(|(_, v)| v.into_owned());
        let given = |key: &str| query(key).filter(|v| !v.is_empty() && !tricky(v)).is_some();
        let segments: Vec<&str> = rest[1..].split('/').collect();
        let media = match segments.as_slice() {
            ["data", "upload", file @ ..] => file.iter().any(|s| !s.is_empty()),
            ["data", "local-files", ""] | ["data", "local-files"] => given("d"),
            ["storage-data", "uploaded", ""] | ["storage-data", "uploaded"] => given("filepath"),
            ["tasks" | "projects", id, "presign" | "resolve", ""] => {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && given("fileuri")
            }
            _ => false,
        };
        if media { Ok(()) } else { refuse("not a media path") }
    }

    /// Fetches one image, within the size limit, reserving its bytes from `budget` as they
    /// arrive; follows a redirect only to `--label-studio-storage-hosts`, without the token.
    pub async fn fetch(&self, url: reqwest::Url, budget: &MemoryBudget) -> Result<(Bytes, Reservation), Error> {
        // The token goes only to Label Studio: once a hop leaves it, no later hop gets it back.
        let with_token = std::sync::atomic::AtomicBool::new(true);
        let token_on = || with_token.load(std::sync::atomic::Ordering::Relaxed);
        let request = |u: &reqwest::Url| {
            let req = self.client.get(u.clone());
            match (token_on(), &self.token) {
                (true, Some(token)) => req.header(reqwest::header::AUTHORIZATION, format!("Token {token}")),
                _ => req,
            }
        };
        let follow = |next: reqwest::Url| {
            let next = self.redirect(next, token_on())?;
            with_token.store(token_on() && self.is_label_studio(&next), std::sync::atomic::Ordering::Relaxed);
            Ok(next)
        };
        let bounds = fetch::Bounds { max_bytes: self.max_bytes, max_redirects: MAX_REDIRECTS, describe: &plain };
        let mut body = Held { budget, max_bytes: self.max_bytes, buf: None };
        fetch::get(url, &bounds, request, follow, &mut body).await?;
        match body.buf {
            Some(buf) => Ok(buf.into_parts()),
            None => Err(Error::Internal("a fetched body was never begun".into())),
        }
    }

    /// Checks a redirect target: a Label Studio media path (while the token is still in play),
    /// or an http(s) URL on an allowed storage host.
    fn redirect(&self, next: reqwest::Url, with_token: bool) -> Result<reqwest::Url, Error> {
        if with_token && self.is_label_studio(&next) {
            self.check_media_path(&next)?;
            return Ok(next);
        }
        if matches!(next.scheme(), "http" | "https")
            && next.username().is_empty()
            && next.password().is_none()
            && self.storage_hosts.allows(&next)
        {
            return Ok(next);
        }
        Err(Error::UrlRefused(format!(
            "Label Studio redirected to {}, a host not in --label-studio-storage-hosts; add the storage's host name \
             there to fetch from it",
            shown(&next)
        )))
    }
}

/// A fetched body held in the memory budget as it arrives.
struct Held<'a> {
    budget: &'a MemoryBudget,
    max_bytes: usize,
    buf: Option<HeldBuffer>,
}

impl fetch::Sink for Held<'_> {
    fn begin(&mut self, declared: usize) -> Result<(), Error> {
        self.buf = Some(HeldBuffer::new(self.budget, declared, self.max_bytes)?);
        Ok(())
    }

    fn extend(&mut self, chunk: &[u8]) -> Result<(), Error> {
        match &mut self.buf {
            Some(buf) => buf.extend(chunk),
            None => Err(Error::Internal("a fetched body was extended before it began".into())),
        }
    }
}

/// A reqwest error as it may appear in an answer: without the URL its `Display` would carry
/// (query, signature and all), and saying so when it timed out.
fn plain(e: reqwest::Error) -> String {
    let timed_out = e.is_timeout();
    let e = e.without_url();
    if timed_out { format!("timed out (--label-studio-timeout-ms): {e}") } else { e.to_string() }
}

/// Decodes a `data:image/...;base64,...` reference into a held buffer, refusing it once its
/// size is known to pass `limit`.
pub fn decode_data_uri(reference: &str, limit: usize, budget: &MemoryBudget) -> Result<(Bytes, Reservation), Error> {
    let bad = |why: &str| Error::UnresolvedImage(format!("data: URI: {why}"));
    let rest = reference.get(5..).ok_or_else(|| bad("empty"))?;
    let (meta, payload) = rest.split_once(',').ok_or_else(|| bad("no comma before the data"))?;
    let meta = meta.to_ascii_lowercase();
    let Some(media_type) = meta.strip_suffix(";base64") else {
        return Err(bad("only base64 data: URIs are read (data:image/png;base64,...)"));
    };
    // Label Studio itself inlines storage files as `application/octet-stream`; the decoder reads
    // the format from the bytes.
    if !(media_type.is_empty() || media_type.starts_with("image/") || media_type == "application/octet-stream") {
        return Err(bad(&format!("media type `{media_type}` is not an image")));
    }
    let size = payload.len() / 4 * 3;
    if size > limit + 2 {
        return Err(Error::ImageTooLarge { size, limit });
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let mut buf = HeldBuffer::new(budget, size.min(limit), limit)?;
    // Four-character groups decode on their own, so the image is decoded in slices, without a
    // second full-size copy.
    let mut out = vec![0; 3 * 1024];
    for piece in payload.as_bytes().chunks(4 * 1024) {
        let n = engine.decode_slice(piece, &mut out).map_err(|e| bad(&format!("not base64: {e}")))?;
        if buf.len() + n > limit {
            return Err(Error::ImageTooLarge { size: buf.len() + n, limit });
        }
        buf.extend(&out[..n])?;
    }
    Ok(buf.into_parts())
}

/// Whether a reference is a `data:` URI.
pub fn is_data_uri(reference: &str) -> bool {
    reference.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ls() -> LabelStudio {
        LabelStudio::new("http://ls.local:8080", Some("t".into()), Duration::from_secs(1), 1 << 20).unwrap()
    }

    #[test]
    fn only_media_paths_on_the_label_studio_host_are_fetched() {
        let ls = ls();
        for (reference, want) in [
            ("/data/upload/1/a.png", "http://ls.local:8080/data/upload/1/a.png"),
            ("http://ls.local:8080/data/upload/7/x.png", "http://ls.local:8080/data/upload/7/x.png"),
            ("/data/local-files/?d=cats/a.png", "http://ls.local:8080/data/local-files/?d=cats/a.png"),
            (
                "/storage-data/uploaded/?filepath=upload/1/a.png",
                "http://ls.local:8080/storage-data/uploaded/?filepath=upload/1/a.png",
            ),
            ("/tasks/3/resolve/?fileuri=czM6Ly9iL2E=", "http://ls.local:8080/tasks/3/resolve/?fileuri=czM6Ly9iL2E="),
            ("/data/upload/1/a%20b.png", "http://ls.local:8080/data/upload/1/a%20b.png"),
        ] {
            assert_eq!(ls.resolve(reference, "1").unwrap().as_str(), want);
        }
        for other in [
            "http://ls.local:9090/data/upload/1/x.png",
            "https://ls.local:8080/data/upload/1/x.png",
            "http://evil.example/data/upload/1/x.png",
            "//evil.example/data/upload/1/x.png",
            "file:///etc/passwd",
            "/api/projects",
            "/api/tasks/1",
            "/data/upload/../../api/projects",
            "/data/upload/%2e%2e/%2E%2E/api/projects",
            "/data/upload/.%2e/.%2e/api/projects",
            "/data/upload/..%2f..%2fapi/projects",
            "\\data\\upload\\..\\..\\api\\projects",
            "/data/upload//1/x.png",
            "/data/upload/",
            "/data/local-files/?d=",
            "/data/local-files/?d=../../etc/passwd",
            "/data/local-files/x.png",
            "/storage-data/uploaded/",
            "/tasks/x/presign/?fileuri=a",
            "/tasks/1/presign/",
            "/tasks/1/",
            "http://admin:pw@ls.local:8080/data/upload/1/x.png",
            "/user/login/",
            "/",
        ] {
            let e = ls.resolve(other, "1").unwrap_err();
            assert!(matches!(e, Error::UrlRefused(_)) && e.to_string().contains("refused"), "{other}: {e}");
        }
        assert!(LabelStudio::new("ftp://x", None, Duration::from_secs(1), 1).is_err());
    }

    #[test]
    fn cloud_uris_go_through_the_presign_endpoint() {
        let ls = ls();
        // Label Studio's SDK: urlsafe base64, with padding, of the URI; the task's own id.
        let url = ls.resolve("s3://bucket/cats/cat.png", "42").unwrap();
        assert_eq!(url.as_str(), "http://ls.local:8080/tasks/42/presign/?fileuri=czM6Ly9idWNrZXQvY2F0cy9jYXQucG5n");
        let url = ls.resolve("gs://b/a?b>c.png", "42").unwrap();
        assert!(url.as_str().ends_with("fileuri=Z3M6Ly9iL2E_Yj5jLnBuZw=="), "{url}");
        assert!(ls.resolve("azure-blob://c/x.png", "1").unwrap().path() == "/tasks/1/presign/");
        let sub = LabelStudio::new("http://ls.local/ls/", None, Duration::from_secs(1), 1).unwrap();
        assert_eq!(sub.resolve("s3://b/k", "5").unwrap().path(), "/ls/tasks/5/presign/");
        // Behind a path prefix, upload paths come with or without it (label-studio-sdk#575).
        for r in ["/ls/data/upload/4/a.png", "/data/upload/4/a.png", "http://ls.local/ls/data/upload/4/a.png"] {
            assert_eq!(sub.resolve(r, "1").unwrap().as_str(), "http://ls.local/ls/data/upload/4/a.png", "{r}");
        }
        for r in ["/ls/api/projects", "/ls/../api/projects", "/api/projects", "//evil.example/ls/data/upload/1/a"] {
            assert!(matches!(sub.resolve(r, "1"), Err(Error::UrlRefused(_))), "{r}");
        }
        assert!(matches!(ls.resolve("s3://b/k", "t-1"), Err(Error::UnresolvedImage(_))));
        // Schemes in any case; the URI goes to Label Studio with its scheme in lower case.
        for (upper, lower) in
            [("S3://bucket/k", "s3://bucket/k"), ("GS://b/k", "gs://b/k"), ("Azure-Blob://c/k", "azure-blob://c/k")]
        {
            assert_eq!(ls.resolve(upper, "42").unwrap(), ls.resolve(lower, "42").unwrap(), "{upper}");
        }
        // Task ids that are not Label Studio's numbers (as TaskId keeps floats and ids past u64).
        for id in ["", "-4", "3.0", "1.1805916207174113e21", "18446744073709551616", "1e3"] {
            let e = ls.resolve("s3://b/k", id).unwrap_err();
            assert!(matches!(e, Error::UnresolvedImage(_)) && e.to_string().contains("whole number"), "{id}: {e}");
        }
        assert!(ls.resolve("s3://b/k", "18446744073709551615").is_ok());
    }

    #[test]
    fn redirects_go_only_to_allowed_storage_hosts_without_the_token() {
        let hosts = StorageHosts::parse(&["bucket.s3.amazonaws.com".into(), "*.blob.core.windows.net".into()]).unwrap();
        let ls = ls().with_storage_hosts(hosts);
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(ls.redirect(url("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=s"), true).is_ok());
        assert!(ls.redirect(url("https://acct.blob.core.windows.net/c/k"), true).is_ok());
        for refused in [
            "https://evil.example/k",
            "https://blob.core.windows.net/c/k",
            "https://xblob.core.windows.net/c/k",
            "https://bucket.s3.amazonaws.com.evil.example/k",
            "ftp://bucket.s3.amazonaws.com/k",
            "http://ls.local:8080/api/projects",
        ] {
            let e = ls.redirect(url(refused), true).unwrap_err();
            assert!(!e.to_string().contains("Signature"), "{e}");
            assert!(matches!(e, Error::UrlRefused(_)), "{refused}: {e}");
        }
        // Back on Label Studio only to a media path, and never once the token is left behind.
        assert!(ls.redirect(url("http://ls.local:8080/data/upload/1/a.png"), true).is_ok());
        assert!(ls.redirect(url("http://ls.local:8080/data/upload/1/a.png"), false).is_err());
        assert!(StorageHosts::parse(&["https://x".into()]).is_err());
        assert!(StorageHosts::parse(&["x/y".into()]).is_err());
    }

    #[test]
    fn data_uris_are_decoded_within_the_limit() {
        let budget = MemoryBudget::unlimited();
        let png = std::iter::repeat_n(7u8, 5000).collect::<Vec<_>>();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let (bytes, _) = decode_data_uri(&format!("data:image/png;base64,{b64}"), 1 << 20, &budget).unwrap();
        assert_eq!(bytes.as_ref(), png.as_slice());
        assert!(decode_data_uri(&format!("DATA:;BASE64,{b64}"), 1 << 20, &budget).is_ok());
        // As Label Studio inlines storage files (label-studio-ml-backend#632).
        assert!(decode_data_uri(&format!("data:application/octet-stream;base64,{b64}"), 1 << 20, &budget).is_ok());
        let e = decode_data_uri(&format!("data:image/png;base64,{b64}"), 1000, &budget).unwrap_err();
        assert!(matches!(e, Error::ImageTooLarge { .. }), "{e}");
        for bad in ["data:image/png,abc", "data:text/html;base64,AAAA", "data:image/png;base64,@@@@", "data:"] {
            assert!(matches!(decode_data_uri(bad, 1 << 20, &budget), Err(Error::UnresolvedImage(_))), "{bad}");
        }
    }
}
