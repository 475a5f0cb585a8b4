//! `GET /docs`: Swagger UI for `/openapi.json`, from the vendored npm package `swagger-ui-dist`
//! (static/swagger-ui/), embedded in the binary. A Content-Security-Policy limits the page to
//! this origin, so a browser viewing it never calls out.

use axum::{
    extract::Path,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::error::Error;

const CSP: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'";

fn asset(name: &str) -> Option<(&'static [u8], &'static str)> {
    Some(match name {
        "" | "index.html" => {
            (include_bytes!("../../static/swagger-ui/index.html").as_slice(), "text/html; charset=utf-8")
        }
        "init.js" => (include_bytes!("../../static/swagger-ui/init.js").as_slice(), "text/javascript"),
        "swagger-ui-bundle.js" => {
            (include_bytes!("../../static/swagger-ui/swagger-ui-bundle.js").as_slice(), "text/javascript")
        }
        "swagger-ui.css" => (include_bytes!("../../static/swagger-ui/swagger-ui.css").as_slice(), "text/css"),
        "favicon-32x32.png" => (include_bytes!("../../static/swagger-ui/favicon-32x32.png").as_slice(), "image/png"),
        _ => return None,
    })
}

fn respond(body: &'static [u8], content_type: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    r
}

/// The Swagger UI page.
pub async fn index() -> Response {
    let (body, ct) = asset("").expect("index is embedded");
    respond(body, ct)
}

/// One of the page's files.
pub async fn file(Path(name): Path<String>) -> Result<Response, Error> {
    asset(&name).map(|(body, ct)| respond(body, ct)).ok_or(Error::NotFound)
}
