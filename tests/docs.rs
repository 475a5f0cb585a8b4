//! `GET /docs`: Swagger UI for /openapi.json from the vendored swagger-ui-dist, rendered by a
//! real headless Chromium (Debian `chromium`, installed by `make tools`) that is not allowed to
//! reach any host but loopback.

mod common;

use common::Server;

fn chromium() -> std::path::PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("chromium is needed for this test: `make tools` installs it (Debian package chromium)")
}

/// Runs headless Chromium on `url` with every host but 127.0.0.1 unresolvable and a dead proxy
/// for anything else, so a page that needs the internet renders broken.
fn headless(url: &str, dir: &std::path::Path, what: &[&str]) -> std::process::Output {
    std::process::Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"])
        .args(["--proxy-bypass-list=127.0.0.1", "--virtual-time-budget=15000", "--window-size=1280,1000"])
        .args(what)
        .arg(url)
        .output()
        .unwrap()
}

#[test]
fn docs_render_swagger_ui_offline_in_headless_chromium() {
    let s = Server::start(&[]);
    let page = s.get("/docs");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().starts_with("default-src 'self'"));
    let html = page.text().unwrap();
    assert!(html.contains("/docs/swagger-ui-bundle.js") && !html.contains("https://"), "{html}");
    assert_eq!(s.get("/docs/swagger-ui-bundle.js").status(), 200);
    common::assert_error(s.get("/docs/missing.js"), 404, "not_found");

    let dir = std::env::temp_dir().join(format!("qscore-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("{}/docs", s.url);
    let dom = headless(&url, &dir, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for want in ["swagger-ui", "/v1/score", "/v1/score/batch", "/v2/models/{name}/infer", "kserve-v2"] {
        assert!(dom.contains(want), "the rendered page lacks `{want}`:\n{}", &dom[..dom.len().min(3000)]);
    }

    let shot = dir.join("docs.png");
    let out = headless(&url, &dir, &[&format!("--screenshot={}", shot.display())]);
    assert!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(img.width() >= 1000 && colours.len() > 50, "the screenshot looks blank ({} colours)", colours.len());

    // The page fetched the document from this server (and, with no other host reachable, from
    // nowhere else).
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_http_requests_total{route=\"/openapi.json\",status=\"2xx\"}"), "{metrics}");
    std::fs::remove_dir_all(dir).unwrap();
}
