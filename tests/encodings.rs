//! Compressed request bodies (`Content-Encoding: gzip`, `deflate`) on every route that reads a
//! body, as curl, tritonclient (tests/kserve.rs) and proxies send them; an unknown coding is a
//! 415 naming it and a corrupt stream a 400, both JSON. The decoded size's limits are in
//! tests/limits.rs (`compression_bombs_are_held_to_the_decoded_limits`).

mod common;

use std::io::Write;

use common::{Server, assert_error, fixture, read};
use flate2::{
    Compression,
    write::{GzEncoder, ZlibEncoder},
};
use serde_json::{Value, json};

const MODEL: &str = "fmnist-simclr";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2).
fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn post(s: &Server, path: &str, content_type: &str, encoding: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    s.client()
        .post(format!("{}{path}", s.url))
        .header("content-type", content_type)
        .header("content-encoding", encoding)
        .body(body)
        .send()
        .unwrap()
}

#[test]
fn compressed_bodies_are_decoded_on_every_route() {
    let s = Server::start(&[]);
    let png = read("fmnist/bag/t10k-00030.png");
    let score = format!("/v1/score?model={MODEL}");
    let expected: Value = s.post_raw(&score, "image/png", png.clone()).json().unwrap();
    let q = expected["q_score"].as_f64().unwrap();

    // A raw image, under every spelling of the codings (case-insensitive, x-gzip, identity).
    for (encoding, body) in [
        ("gzip", gzip(&png)),
        ("GZIP", gzip(&png)),
        ("x-gzip", gzip(&png)),
        ("deflate", deflate(&png)),
        (" Deflate ", deflate(&png)),
        ("identity", png.clone()),
    ] {
        let r = post(&s, &score, "image/png", encoding, body);
        assert_eq!(r.status(), 200, "{encoding:?}");
        assert_eq!(r.json::<Value>().unwrap()["q_score"].as_f64(), Some(q), "{encoding:?}");
    }

    // A multipart batch and a JSON batch.
    let mut form = b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"bag.png\"\r\n\r\n".to_vec();
    form.extend(&png);
    form.extend(b"\r\n--XyZ--\r\n");
    let batch = format!("/v1/score/batch?model={MODEL}");
    let r = post(&s, &batch, "multipart/form-data; boundary=XyZ", "gzip", gzip(&form));
    let answer: Value = r.json().unwrap();
    assert_eq!(
        (answer["results"][0]["id"].as_str(), answer["results"][0]["q_score"].as_f64()),
        (Some("bag.png"), Some(q))
    );
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
    let json = serde_json::to_vec(&json!({"images": [{"id": "j", "data": b64}]})).unwrap();
    let answer: Value = post(&s, &batch, "application/json", "deflate", deflate(&json)).json().unwrap();
    assert_eq!(answer["results"][0]["q_score"].as_f64(), Some(q), "{answer}");

    // KServe v2 JSON.
    let infer = format!("/v2/models/{MODEL}/infer");
    let v2 = json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]});
    let r = post(&s, &infer, "application/json", "gzip", gzip(&serde_json::to_vec(&v2).unwrap()));
    assert_eq!(r.status(), 200);
    assert!((r.json::<Value>().unwrap()["outputs"][0]["data"][0].as_f64().unwrap() - q).abs() < 1e-6);

    // Label Studio: the body is read (an empty task list is refused for what it is, not as
    // undecodable JSON).
    let r = post(&s, "/predict", "application/json", "gzip", gzip(br#"{"tasks": [], "label_config": "<View/>"}"#));
    let text = r.text().unwrap();
    assert!(!text.contains("expected value") && !text.contains("invalid"), "{text}");

    // curl, the way its users compress a body by hand.
    let dir = std::env::temp_dir().join(format!("qscore-enc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gz = dir.join("bag.png.gz");
    std::fs::write(&gz, gzip(&png)).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-H", "Content-Type: image/png", "-H", "Content-Encoding: gzip", "--data-binary"])
        .arg(format!("@{}", gz.display()))
        .arg(format!("{}{score}", s.url))
        .output()
        .expect("curl is a system program: install it (apt-get install curl)");
    let _ = std::fs::remove_dir_all(&dir);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["q_score"].as_f64(), Some(q), "{answer}");
}

#[test]
fn unknown_codings_and_corrupt_streams_are_json_errors() {
    let s = Server::start(&[]);
    let png = std::fs::read(fixture("fmnist/bag/t10k-00030.png")).unwrap();
    for encoding in ["br", "zstd", "compress", "gzip, gzip"] {
        let r = post(&s, "/v1/score", "image/png", encoding, png.clone());
        assert_eq!(r.headers().get("accept-encoding").unwrap(), "gzip, deflate, identity");
        let e = assert_error(r, 415, "unsupported_content_encoding");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{encoding}`")) && message.contains("gzip"), "{message}");
    }
    // The KServe routes answer in their protocol's error shape.
    let r = post(&s, &format!("/v2/models/{MODEL}/infer"), "application/json", "br", b"{}".to_vec());
    assert_eq!(r.status(), 415);
    assert!(r.json::<Value>().unwrap()["error"].as_str().unwrap().contains("`br`"));

    // Not gzip at all, and a gzip stream cut short.
    let cut = gzip(&png);
    for body in [png.clone(), cut[..cut.len() / 2].to_vec()] {
        assert_error(post(&s, "/v1/score", "image/png", "gzip", body), 400, "bad_request");
    }
    assert_error(post(&s, "/v1/score", "image/png", "deflate", png), 400, "bad_request");
    s.assert_ready();
}

/// Several `Content-Encoding` lines are one list (RFC 9110 §5.3): two `gzip` lines are the
/// stacked `gzip, gzip` (a 415, as the one-line form), `identity` and `gzip` are gzip, and a
/// coding qscore does not decode on any line is a 415 naming the whole list.
#[test]
fn several_content_encoding_lines_are_one_list() {
    let s = Server::start(&[]);
    let png = read("fmnist/bag/t10k-00030.png");
    let score = format!("/v1/score?model={MODEL}");
    let send = |lines: &[&str], body: Vec<u8>| {
        let mut r = s.client().post(format!("{}{score}", s.url)).header("content-type", "image/png");
        for line in lines {
            r = r.header("content-encoding", *line);
        }
        r.body(body).send().unwrap()
    };
    let q = s.post_raw(&score, "image/png", png.clone()).json::<Value>().unwrap()["q_score"].as_f64();
    for (lines, body) in [
        (&["identity", "gzip"][..], gzip(&png)),
        (&["gzip", "identity"][..], gzip(&png)),
        (&["x-gzip", ""][..], gzip(&png)),
        (&["identity", "identity"][..], png.clone()),
        (&["deflate", "Identity"][..], deflate(&png)),
    ] {
        let r = send(lines, body);
        assert_eq!(r.status(), 200, "{lines:?}");
        assert_eq!(r.json::<Value>().unwrap()["q_score"].as_f64(), q, "{lines:?}");
    }
    for (lines, body, shown) in [
        (&["gzip", "gzip"][..], gzip(&gzip(&png)), "gzip, gzip"),
        (&["gzip", "br"][..], gzip(&png), "gzip, br"),
        (&["br", "gzip"][..], gzip(&png), "br, gzip"),
        (&["gzip", "deflate"][..], deflate(&gzip(&png)), "gzip, deflate"),
        (&["gzip, identity", "deflate"][..], deflate(&gzip(&png)), "gzip, identity, deflate"),
    ] {
        let r = send(lines, body);
        assert_eq!(r.headers().get("accept-encoding").unwrap(), "gzip, deflate, identity");
        let e = assert_error(r, 415, "unsupported_content_encoding");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{shown}`")), "{lines:?}: {message}");
    }
    s.assert_ready();
}
