//! One image over HTTP(S), within bounds: the loop every edge that fetches for a client shares
//! (Label Studio's media, a backfill's URLs). Redirects are followed by hand, so the caller
//! checks every hop (an allow-list, where a token may still go); the body is refused by its
//! Content-Length before it is read and by its bytes while it is read, so no answer can make
//! the fetch hold more than the limit.

use reqwest::{RequestBuilder, Url};

use crate::error::Error;

/// Where a fetched body goes as it arrives.
pub trait Sink {
    /// Called once, before the first byte, with the size the server declared (0: unknown).
    fn begin(&mut self, declared: usize) -> Result<(), Error>;
    /// Appends one chunk; the total is already known to be within the limit.
    fn extend(&mut self, chunk: &[u8]) -> Result<(), Error>;
}

impl Sink for Vec<u8> {
    fn begin(&mut self, declared: usize) -> Result<(), Error> {
        self.reserve_exact(declared);
        Ok(())
    }

    fn extend(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.extend_from_slice(chunk);
        Ok(())
    }
}

/// How one fetch is bounded and checked.
pub struct Bounds<'a> {
    /// Largest body, in bytes.
    pub max_bytes: usize,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// A transport error as it may appear in an answer (say which flag bounds a timeout; never
    /// the URL with its query).
    pub describe: &'a (dyn Fn(reqwest::Error) -> String + Sync),
}

/// GETs `url` into `sink`. `request` builds each hop's request (headers such as a token);
/// `follow` checks a redirect's target and answers the URL to fetch next, or why not. A status
/// other than 2xx or a followed 3xx is a `FetchFailed` naming it; a body past
/// `bounds.max_bytes` is `ImageTooLarge`.
pub async fn get(
    url: Url,
    bounds: &Bounds<'_>,
    mut request: impl FnMut(&Url) -> RequestBuilder,
    mut follow: impl FnMut(Url) -> Result<Url, Error>,
    sink: &mut impl Sink,
) -> Result<(), Error> {
    let mut url = url;
    for hop in 0..=bounds.max_redirects {
        let shown = shown(&url);
        let failed = |e: reqwest::Error| Error::FetchFailed(format!("cannot fetch {shown}: {}", (bounds.describe)(e)));
        let mut resp = request(&url).send().await.map_err(failed)?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .filter(|_| matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308))
                .ok_or_else(|| Error::FetchFailed(format!("fetching {shown} answered {status}")))?;
            if hop == bounds.max_redirects {
                return Err(Error::FetchFailed(format!(
                    "fetching {shown}: more than {} redirects",
                    bounds.max_redirects
                )));
            }
            let next =
                url.join(location).map_err(|e| Error::FetchFailed(format!("{shown} redirected to a bad URL: {e}")))?;
            url = follow(next)?;
            continue;
        }
        if !status.is_success() {
            return Err(Error::FetchFailed(format!("fetching {shown} answered {status}")));
        }
        let too_large = |size: u64| Error::ImageTooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            limit: bounds.max_bytes,
        };
        let declared = resp.content_length().unwrap_or(0);
        if declared > bounds.max_bytes as u64 {
            return Err(too_large(declared));
        }
        sink.begin(declared as usize)?;
        let mut read = 0_usize;
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            read += chunk.len();
            if read > bounds.max_bytes {
                // Its real size is unknown: it stopped being read here.
                return Err(Error::ImageOverLimit { read, limit: bounds.max_bytes });
            }
            sink.extend(&chunk)?;
        }
        return Ok(());
    }
    unreachable!("the loop returns by its last hop")
}

/// A URL as it may appear in an answer or a row: without its query, which for a presigned
/// storage URL holds the signature.
pub fn shown(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}
