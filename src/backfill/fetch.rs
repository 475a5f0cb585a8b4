//! Where a manifest entry's bytes come from: a local file, or an http(s) URL on an allowed host.
//!
//! Both are bounded by `--max-image-bytes` before the bytes are held: a file by its size, a
//! URL by its declared Content-Length and then by every chunk as it arrives. A URL is fetched
//! only from a host given to `--allow-host`, and a redirect only when its target is one too
//! (each hop checked, at most [`MAX_REDIRECTS`]), so a manifest cannot make a backfill job
//! reach into the cluster's internal services. Every failure is the entry's own error.

use std::{
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;

use crate::{
    error::Error,
    fetch::{self, shown},
};

/// Redirects followed at most per URL.
pub const MAX_REDIRECTS: usize = 5;

/// One `--allow-host` entry: a host name or IP address, with or without a port.
///
/// `HOST` allows any port of that host; `HOST:PORT` only that port, compared with the URL's
/// port or its scheme's default (`http://h/` is port 80). Host names compare case-insensitively
/// and exactly: `example.com` does not allow `cdn.example.com`. An IPv6 address is written in
/// brackets, as in a URL: `[::1]:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// The host, lowercase (IPv6 in brackets).
    pub host: String,
    /// The one port allowed, or any.
    pub port: Option<u16>,
}

impl std::str::FromStr for AllowedHost {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let err = || {
            format!(
                "`{s}` is not a host; write HOST or HOST:PORT (no scheme or path), e.g. images.example.com or 127.0.0.1:8000"
            )
        };
        let (host, port) = match s.rsplit_once(':') {
            // A colon inside an unbracketed IPv6 address is not a port.
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p.parse::<u16>().map_err(|_| err())?)),
            _ => (s.as_str(), None),
        };
        let host_like = !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
        if !host_like {
            return Err(err());
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

impl AllowedHost {
    fn allows(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        host.eq_ignore_ascii_case(&self.host) && self.port.is_none_or(|p| url.port_or_known_default() == Some(p))
    }
}

/// Reads the bytes of manifest entries.
pub struct Sources {
    /// Relative paths are read from here: the manifest's folder.
    base: PathBuf,
    allowed: Vec<AllowedHost>,
    max_bytes: usize,
    client: reqwest::Client,
    timeout: Duration,
}

impl Sources {
    /// Sources for a manifest in `base`, URLs from `allowed` hosts only, each image at most
    /// `max_bytes`, each fetch within `timeout`.
    pub fn new(base: PathBuf, allowed: Vec<AllowedHost>, max_bytes: usize, timeout: Duration) -> anyhow::Result<Self> {
        // Redirects are followed by hand, so that each hop is checked against the allow-list.
        let client = reqwest::Client::builder().timeout(timeout).redirect(reqwest::redirect::Policy::none()).build()?;
        Ok(Self { base, allowed, max_bytes, client, timeout })
    }

    /// Whether `text` names a URL rather than a file: it has a scheme.
    pub fn is_url(text: &str) -> bool {
        text.split_once("://").is_some_and(|(scheme, _)| {
            !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        })
    }

    /// The bytes `text` names.
    pub async fn load(&self, text: &str) -> Result<Bytes, Error> {
        if Self::is_url(text) {
            return self.fetch(text).await;
        }
        let path = self.base.join(text);
        let max = self.max_bytes;
        let read = tokio::task::spawn_blocking(move || read_file(&path, max))
            .await
            .map_err(|e| Error::Internal(format!("file task failed: {e}")))?;
        match read {
            Err(Error::UnreadableFile(why)) if Path::new(text).is_relative() => Err(Error::UnreadableFile(format!(
                "{why}; relative paths are read from the manifest's folder, {}: write absolute paths, or paths \
                 relative to it",
                self.base.display()
            ))),
            other => other,
        }
    }

    fn check(&self, url: &reqwest::Url) -> Result<(), Error> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::UrlRefused(format!(
                "{}: only http and https URLs are fetched; copy the image to a local path or an http(s) server",
                shown(url)
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::UrlRefused(format!(
                "{}: URLs with credentials are refused; serve the image without them",
                shown(url)
            )));
        }
        if self.allowed.iter().any(|a| a.allows(url)) {
            return Ok(());
        }
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(Error::UrlRefused(format!("{}: the URL has no host", shown(url)))),
        };
        Err(Error::UrlRefused(format!(
            "{}: host `{host}` is not allowed; pass --allow-host {host} to fetch from it",
            shown(url)
        )))
    }

    async fn fetch(&self, text: &str) -> Result<Bytes, Error> {
        let url =
            reqwest::Url::parse(text).map_err(|e| Error::UrlRefused(format!("`{text}` is not a valid URL: {e}")))?;
        self.check(&url)?;
        let describe = |e: reqwest::Error| {
            if e.is_timeout() {
                format!("timed out after {} ms (--fetch-timeout-ms)", self.timeout.as_millis())
            } else {
                e.without_url().to_string()
            }
        };
        let bounds = fetch::Bounds { max_bytes: self.max_bytes, max_redirects: MAX_REDIRECTS, describe: &describe };
        let mut body = Vec::new();
        let follow = |next: reqwest::Url| self.check(&next).map(|()| next);
        fetch::get(url, &bounds, |u| self.client.get(u.clone()), follow, &mut body).await?;
        Ok(Bytes::from(body))
    }
}

/// Reads a local image, refusing one over `max` bytes before reading it, and anything but a
/// regular file before opening it ([`crate::regular_file`]): a FIFO in a manifest would block.
pub fn read_file(path: &Path, max: usize) -> Result<Bytes, Error> {
    let unreadable = |e: std::io::Error| Error::UnreadableFile(format!("{}: {e}", path.display()));
    let (file, meta) = crate::regular_file::open(path).map_err(unreadable)?;
    if meta.len() > max as u64 {
        return Err(Error::ImageTooLarge { size: usize::try_from(meta.len()).unwrap_or(usize::MAX), limit: max });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // The file may grow after the check: never read past the limit.
    file.take(max as u64 + 1).read_to_end(&mut buf).map_err(unreadable)?;
    if buf.len() > max {
        return Err(Error::ImageOverLimit { read: buf.len(), limit: max });
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn hosts_match_exactly_with_port_semantics() {
        let any: AllowedHost = "Images.Example.com".parse().unwrap();
        assert!(any.allows(&url("https://images.example.com/a.png")));
        assert!(any.allows(&url("http://images.example.com:8080/a.png")));
        assert!(!any.allows(&url("https://cdn.images.example.com/a.png")));
        let one: AllowedHost = "127.0.0.1:8000".parse().unwrap();
        assert!(one.allows(&url("http://127.0.0.1:8000/a.png")));
        assert!(!one.allows(&url("http://127.0.0.1:8001/a.png")));
        let default_port: AllowedHost = "h:80".parse().unwrap();
        assert!(default_port.allows(&url("http://h/a.png")));
        assert!(!default_port.allows(&url("https://h/a.png")));
        let v6: AllowedHost = "[::1]:9000".parse().unwrap();
        assert!(v6.allows(&url("http://[::1]:9000/a.png")));
        for bad in ["http://h", "h/path", "h:port", "", "h:99999"] {
            assert!(bad.parse::<AllowedHost>().is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_told_from_paths() {
        assert!(Sources::is_url("http://h/a.png"));
        assert!(Sources::is_url("s3://bucket/a.png"));
        assert!(!Sources::is_url("images/a.png"));
        assert!(!Sources::is_url("/data/odd://name.png"));
    }
}
