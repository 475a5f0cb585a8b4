//! Multipart uploads from the HTTP clients people really use, against the real server: Python
//! requests, httpx and aiohttp (installed into .venv-test by `make tools`), curl's `-F`, Java's
//! `java.net.http.HttpClient` with a hand-built body, and Node's built-in `fetch` with
//! `FormData`. Each sends one image to `/v1/score` and a batch under file names with spaces,
//! mixed case and non-ASCII characters to `/v1/score/batch`; every id must come back with the
//! score the raw-body upload of the same image gets. Then the header forms those clients (and
//! RFC 7578 / RFC 6266) allow, built by hand.
//!
//! A missing client fails the test with what to install: Python's come from `make tools`;
//! curl, Java 17 and Node 20 are system programs (`make tools` does not install them).

mod common;

use std::{path::PathBuf, process::Command};

use common::{Server, fixture, root};
use serde_json::Value;

const MODEL: &str = "fmnist-simclr";

/// The batch's file names: spaces, mixed case, non-ASCII, a quote.
const NAMES: [&str; 4] = ["Mixed Case.PNG", "ünïcödé 写真.png", "plain.png", "say \"hi\".png"];

/// Copies of fmnist fixtures under [`NAMES`], and each one's score from a raw-body upload.
fn images(s: &Server) -> (tempdir::Dir, Vec<(PathBuf, f64)>) {
    let dir = tempdir::Dir::new("clients");
    let sources = ["fmnist/bag/t10k-00030.png", "fmnist/shirt/t10k-00026.png", "fmnist/sandal/t10k-00011.png"];
    let files = NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let bytes = std::fs::read(fixture(sources[i % sources.len()])).unwrap();
            let path = dir.0.join(name);
            std::fs::write(&path, &bytes).unwrap();
            let r = s.post_raw(&format!("/v1/score?model={MODEL}"), "image/png", bytes);
            assert_eq!(r.status(), 200);
            let q = r.json::<Value>().unwrap()["q_score"].as_f64().unwrap();
            (path, q)
        })
        .collect();
    (dir, files)
}

mod tempdir {
    /// A scratch folder, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("qscore-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs a client command and reads its `{"status", "body"}` line.
fn run(what: &str, mut cmd: Command, install: &str) -> (u64, Value) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what} cannot run ({e}): {install}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{what} printed {line:?}: {e}"));
    (v["status"].as_u64().unwrap(), v["body"].clone())
}

/// The command that posts `files` to `url` with `client`.
fn client(name: &str, url: &str, files: &[&PathBuf]) -> (Command, String) {
    let tests = root().join("tests");
    match name {
        "requests" | "httpx" | "aiohttp" => {
            let python = root().join(".venv-test/bin/python");
            assert!(python.exists(), "{} is missing: run `make tools` (make test does)", python.display());
            let mut c = Command::new(python);
            c.arg(tests.join("multipart_client.py")).arg(name).arg(url).args(files);
            (c, format!("python {name} is missing: run `make tools` (tests/requirements.txt)"))
        }
        "curl" => {
            let mut c = Command::new("curl");
            c.args(["-sS", "-w", "\\n%{http_code}", url]);
            for f in files {
                c.arg("-F").arg(format!("image=@{}", f.display()));
            }
            (c, "curl is a system program: install it (apt-get install curl)".into())
        }
        "java" => {
            let mut c = Command::new("java");
            c.arg(tests.join("MultipartClient.java")).arg(url).args(files);
            (c, "Java 17+ is a system program: install a JDK (apt-get install openjdk-17-jdk-headless)".into())
        }
        "node" => {
            let mut c = Command::new("node");
            c.arg(tests.join("multipart_client.mjs")).arg(url).args(files);
            (c, "Node.js 20+ is a system program: install it (apt-get install nodejs)".into())
        }
        _ => unreachable!(),
    }
}

fn post(name: &str, url: &str, files: &[&PathBuf]) -> (u64, Value) {
    let (mut cmd, install) = client(name, url, files);
    if name != "curl" {
        return run(name, cmd, &install);
    }
    // curl prints the body, then the status on its own line.
    let out = cmd.output().unwrap_or_else(|e| panic!("curl cannot run ({e}): {install}"));
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.trim().rsplit_once('\n').unwrap();
    (status.parse().unwrap(), serde_json::from_str(body).unwrap())
}

#[test]
fn real_clients_upload_single_images_and_named_batches() {
    let s = Server::start(&[]);
    s.assert_ready();
    let (_dir, files) = images(&s);
    let single = format!("{}/v1/score?model={MODEL}", s.url);
    let batch = format!("{}/v1/score/batch?model={MODEL}", s.url);
    let mut failures = Vec::new();
    for name in ["requests", "httpx", "aiohttp", "curl", "java", "node"] {
        // Java users write the file name into the header as it is: a `"` in it would break
        // their header, so their batch leaves that name out.
        let sent: Vec<&(PathBuf, f64)> =
            files.iter().filter(|(p, _)| name != "java" || !p.to_string_lossy().contains('"')).collect();
        let (status, body) = post(name, &single, &[&sent[1].0]);
        if status != 200 || (body["q_score"].as_f64().unwrap_or(f64::NAN) - sent[1].1).abs() > 1e-4 {
            failures.push(format!("{name} /v1/score: {status} {body}"));
        }
        let paths: Vec<&PathBuf> = sent.iter().map(|(p, _)| p).collect();
        let (status, body) = post(name, &batch, &paths);
        let results = body["results"].as_array().cloned().unwrap_or_default();
        let ok = status == 200
            && results.len() == sent.len()
            && results.iter().zip(&sent).all(|(r, (p, q))| {
                r["id"] == p.file_name().unwrap().to_str().unwrap()
                    && (r["q_score"].as_f64().unwrap_or(f64::NAN) - q).abs() < 1e-4
            });
        if !ok {
            failures.push(format!("{name} /v1/score/batch: {status} {body}"));
        }
    }
    assert!(failures.is_empty(), "clients that failed:\n{}", failures.join("\n"));
}

/// Multipart forms RFC 7578 / RFC 6266 allow, as some clients write them: parameter names and
/// the disposition type in any case, `filename*` (RFC 8187), escaped quotes, spaces around `=`
/// and `;`, no part Content-Type, a quoted boundary under `Boundary=`, a preamble and an
/// epilogue.
#[test]
fn multipart_header_forms_are_read_as_the_rfcs_say() {
    let s = Server::start(&[]);
    let png = std::fs::read(fixture("fmnist/bag/t10k-00030.png")).unwrap();
    let part = |disposition: &str, content_type: Option<&str>| {
        let mut p = format!("--XyZ\r\nContent-Disposition: {disposition}\r\n").into_bytes();
        if let Some(ct) = content_type {
            p.extend(format!("Content-Type: {ct}\r\n").bytes());
        }
        p.extend(b"\r\n");
        p.extend(&png);
        p.extend(b"\r\n");
        p
    };
    let cases: [(&str, Option<&str>, &str); 9] = [
        (r#"form-data; Name="image"; Filename="Upper.PNG""#, Some("image/png"), "Upper.PNG"),
        (r#"FORM-DATA; NAME=image; FILENAME=bare.png"#, None, "bare.png"),
        (r#"form-data ; name = "image" ; filename = "sp aced.png""#, Some("application/octet-stream"), "sp aced.png"),
        (
            "form-data; name=\"image\"; filename*=UTF-8''%C3%BCml%C3%A4ut%20%E2%9C%93.png; filename=\"fallback.png\"",
            None,
            "ümläut ✓.png",
        ),
        ("form-data; name=\"image\"; FILENAME*=utf-8''a%22b.png", None, "a\"b.png"),
        (r#"form-data; name="image"; filename="say \"hi\".png""#, None, "say \"hi\".png"),
        (r#"form-data; name="image"; filename="say %22hi%22.png""#, None, "say \"hi\".png"),
        (r#"form-data; filename="x; name=file.png"; name="image""#, None, "x; name=file.png"),
        ("form-data; name=\"image\"; filename=\"raw ünï.png\"", None, "raw ünï.png"),
    ];
    let mut body = b"this preamble is ignored\r\n".to_vec();
    for (disposition, ct, _) in &cases {
        body.extend(part(disposition, *ct));
    }
    body.extend(b"--XyZ--\r\nand so is this epilogue\r\n");
    let r = s.post_raw(
        &format!("/v1/score/batch?model={MODEL}"),
        "Multipart/Form-Data; Boundary=\"XyZ\"; charset=utf-8",
        body,
    );
    let status = r.status();
    let answer: Value = r.json().unwrap();
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<&str> = answer["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, cases.iter().map(|c| c.2).collect::<Vec<_>>());
    assert!(answer["results"].as_array().unwrap().iter().all(|r| r["q_score"].is_number()), "{answer}");

    // A part that is not form-data, or not `image`, is still refused, saying which.
    let refused = |disposition: &str| {
        let mut body = part(disposition, None);
        body.extend(b"--XyZ--\r\n");
        let r = s.post_raw("/v1/score", "multipart/form-data; boundary=XyZ", body);
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, e) = refused(r#"form-data; Name="file"; filename="a.png""#);
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("unexpected_field")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`file`"), "{e}");
    let (status, e) = refused(r#"attachment; name="image""#);
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("bad_request")), "{e}");
}
