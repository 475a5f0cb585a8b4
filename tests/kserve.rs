//! KServe v2 / Open Inference Protocol with a real client: tritonclient (PyPI, installed into
//! .venv-test by `make tools`) sends real images through `/v2/models/{name}/infer` with the
//! binary-data extension, and the answers must equal `/v1/score`'s.

mod common;

use common::{Server, fixture, read, root};
use serde_json::Value;

fn tritonclient(s: &Server, model: &str, files: &[std::path::PathBuf]) -> Value {
    tritonclient_with(s, model, files, &[])
}

/// tritonclient with `env` (see tests/kserve_client.py: the tensor's shape, JSON or binary data,
/// request compression).
fn tritonclient_with(s: &Server, model: &str, files: &[std::path::PathBuf], env: &[(&str, &str)]) -> Value {
    let python = root().join(".venv-test/bin/python");
    assert!(python.exists(), "{} is missing: run `make tools` (make test does)", python.display());
    let out = std::process::Command::new(python)
        .envs(env.iter().copied())
        .arg(root().join("tests/kserve_client.py"))
        .arg(s.url.trim_start_matches("http://"))
        .arg(model)
        .args(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "tritonclient failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tritonclient_gets_the_same_scores_as_v1() {
    let s = Server::start(&[]);

    // The calibrated SSL model: Q-Score, p_misclassified, the flag and the embedding.
    let model = "fmnist-simclr";
    let files: Vec<_> = ["bag/t10k-00030.png", "shirt/t10k-00026.png", "trouser/t10k-00002.png", "coat/t10k-00006.png"]
        .iter()
        .map(|f| fixture(&format!("fmnist/{f}")))
        .collect();
    let r = tritonclient(&s, model, &files);
    assert_eq!(
        (r["live"].as_bool(), r["ready"].as_bool(), r["model_ready"].as_bool()),
        (Some(true), Some(true), Some(true))
    );
    assert!(r["server"]["extensions"].as_array().unwrap().contains(&Value::from("binary_tensor_data")));
    let out = &r["outputs"];
    for (i, f) in files.iter().enumerate() {
        let v1: Value =
            s.post_raw(&format!("/v1/embed?model={model}"), "image/png", std::fs::read(f).unwrap()).json().unwrap();
        let (q2, q1) = (out["q_score"][i].as_f64().unwrap(), v1["q_score"].as_f64().unwrap());
        assert!((q2 - q1).abs() <= 1e-6 * q1.abs().max(1.0), "{}: v2 {q2} vs v1 {q1}", f.display());
        let p2 = out["p_misclassified"][i].as_f64().unwrap();
        assert!((p2 - v1["p_misclassified"].as_f64().unwrap()).abs() < 1e-6);
        assert_eq!(out["likely_misclassified"][i], v1["likely_misclassified"]);
        let (e2, e1) = (common::floats(&out["embedding"][i]), common::floats(&v1["embedding"]));
        assert_eq!(e2.len(), 128);
        assert!(e2.iter().zip(&e1).all(|(a, b)| (a - b).abs() < 1e-6));
    }
    assert!(out["likely_misclassified"].as_array().unwrap().iter().any(|f| f == true), "the shirt is flagged");

    // The uncalibrated ImageNet model over real photos: no flag outputs are offered.
    let photos: Vec<_> = ["china.jpg", "rocket.jpg"].iter().map(|p| fixture(&format!("photos/{p}"))).collect();
    let r = tritonclient(&s, "mobilenet_v2-imagenet", &photos);
    let names: Vec<&str> =
        r["metadata"]["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["q_score", "embedding"]);
    for (i, p) in ["china.jpg", "rocket.jpg"].iter().enumerate() {
        let v1: Value =
            s.post_image("/v1/score?model=mobilenet_v2-imagenet", p, read(&format!("photos/{p}"))).json().unwrap();
        let (q2, q1) = (r["outputs"]["q_score"][i].as_f64().unwrap(), v1["q_score"].as_f64().unwrap());
        assert!((q2 - q1).abs() <= 1e-6 * q1.abs().max(1.0), "{p}: v2 {q2} vs v1 {q1}");
    }
}

/// tritonclient's `request_compression_algorithm` compresses the whole infer body (the JSON
/// header and the binary tensor) and keeps `Inference-Header-Content-Length` the uncompressed
/// header's length: the answers must equal the uncompressed request's.
#[test]
fn tritonclient_compressed_requests_get_the_same_answers() {
    let s = Server::start(&[]);
    let model = "fmnist-simclr";
    let files: Vec<_> =
        ["bag/t10k-00030.png", "shirt/t10k-00026.png"].iter().map(|f| fixture(&format!("fmnist/{f}"))).collect();
    let plain = tritonclient(&s, model, &files);
    for algorithm in ["gzip", "deflate"] {
        let r = tritonclient_with(&s, model, &files, &[("QSCORE_COMPRESSION", algorithm)]);
        assert_eq!(r["outputs"], plain["outputs"], "{algorithm}");
    }
}

#[test]
fn v2_errors_follow_the_protocol() {
    let s = Server::start(&[]);
    let post = |path: &str, body: &str| {
        s.client()
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .unwrap()
    };
    let r = post("/v2/models/nope/infer", r#"{"inputs":[]}"#);
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().unwrap()["error"].as_str().unwrap().contains("unknown model"));
    let r =
        post("/v2/models/fmnist-simclr/infer", r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#);
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"].as_str().unwrap().contains("BYTES"));
    let bad = base64_of(&read("bad/truncated.jpg"));
    let r = post(
        "/v2/models/mobilenet_v2-imagenet/infer",
        &format!(r#"{{"inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":["{bad}"]}}]}}"#),
    );
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"].as_str().unwrap().contains("image 0"));
    let good = base64_of(&read("photos/china.jpg"));
    let r = post(
        "/v2/models/mobilenet_v2-imagenet/infer",
        &format!(
            r#"{{"id":"a1","inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":["{good}"]}}],"outputs":[{{"name":"p_misclassified"}}]}}"#
        ),
    );
    assert_eq!(r.status(), 400, "an uncalibrated model has no p_misclassified");
    let r: Value = post(
        "/v2/models/mobilenet_v2-imagenet/infer",
        &format!(r#"{{"id":"a1","inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":["{good}"]}}]}}"#),
    )
    .json()
    .unwrap();
    assert_eq!(r["id"], "a1");
    assert_eq!(r["outputs"][0]["name"], "q_score");
    s.assert_ready();
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The tensor shapes users build with numpy ((N,), (N, 1), (1, N)), sent by tritonclient as
/// binary data and as JSON (base64 strings, flattened): every form answers the same Q-Scores.
/// A (1, N) tensor used to be refused. Nested JSON lists, which other clients send, are checked
/// in the parser's unit tests.
#[test]
fn every_tensor_form_tritonclient_sends_is_read() {
    let s = Server::start(&[]);
    let model = "fmnist-simclr";
    let files: Vec<_> = ["bag/t10k-00030.png", "shirt/t10k-00026.png", "trouser/t10k-00002.png"]
        .iter()
        .map(|f| fixture(&format!("fmnist/{f}")))
        .collect();
    let flat = tritonclient(&s, model, &files)["outputs"]["q_score"].clone();
    assert_eq!(flat.as_array().unwrap().len(), 3);
    for shape in ["flat", "column", "row"] {
        for binary in ["0", "1"] {
            let r =
                tritonclient_with(&s, model, &files, &[("QSCORE_TENSOR_SHAPE", shape), ("QSCORE_BINARY_DATA", binary)]);
            assert_eq!(r["outputs"]["q_score"], flat, "shape {shape}, binary data {binary}");
        }
    }
}

/// Found by a hostile client: `GET /v2/models/{name}` lists a version, but the protocol's
/// versioned routes were 404, so tritonclient with `model_version=` could not infer. They answer
/// as the unversioned ones; an unknown version is a 404 in the protocol's shape.
#[test]
fn versioned_routes_answer_as_the_unversioned_ones() {
    let s = Server::start(&[]);
    let model = "fmnist-simclr";
    let meta: Value = s.get(&format!("/v2/models/{model}")).json().unwrap();
    let version = meta["versions"][0].as_str().unwrap().to_owned();
    let files: Vec<_> =
        ["bag/t10k-00030.png", "shirt/t10k-00026.png"].iter().map(|f| fixture(&format!("fmnist/{f}"))).collect();
    let plain = tritonclient(&s, model, &files);
    let pinned = tritonclient_with(&s, model, &files, &[("QSCORE_MODEL_VERSION", &version)]);
    assert_eq!(pinned["outputs"], plain["outputs"]);
    assert_eq!(pinned["metadata"], plain["metadata"]);
    assert_eq!(pinned["model_ready"], true);

    let versioned: Value = s.get(&format!("/v2/models/{model}/versions/{version}")).json().unwrap();
    assert_eq!(versioned, meta);
    let ready = s.get(&format!("/v2/models/{model}/versions/{version}/ready"));
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().unwrap()["ready"], true);
    let png = base64_of(&read("fmnist/bag/t10k-00030.png"));
    let body = format!(r#"{{"inputs":[{{"name":"image","shape":[1],"datatype":"BYTES","data":["{png}"]}}]}}"#);
    let infer = |path: String| {
        s.client()
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .unwrap()
    };
    let a: Value = infer(format!("/v2/models/{model}/infer")).json().unwrap();
    let b: Value = infer(format!("/v2/models/{model}/versions/{version}/infer")).json().unwrap();
    assert_eq!(a, b);
    for r in [
        s.get(&format!("/v2/models/{model}/versions/9.9.9")),
        s.get(&format!("/v2/models/{model}/versions/9.9.9/ready")),
        infer(format!("/v2/models/{model}/versions/9.9.9/infer")),
        infer(format!("/v2/models/nope/versions/{version}/infer")),
    ] {
        assert_eq!(r.status(), 404);
        let e: Value = r.json().unwrap();
        assert!(e["error"].as_str().unwrap().contains("unknown model"), "{e}");
    }
}

/// Every error answered under `/v2` is the protocol's `{"error": "message"}`: the API key's 401
/// (with its WWW-Authenticate), a route that does not exist, a method a route does not take.
#[test]
fn every_v2_error_has_the_protocol_shape() {
    let dir = std::env::temp_dir().join(format!("qscore-v2-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "key-one\n").unwrap();
    let s = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    let shape = |r: reqwest::blocking::Response, status: u16| {
        assert_eq!(r.status(), status);
        let headers = r.headers().clone();
        let e: Value = r.json().unwrap();
        assert!(e["error"].is_string(), "{status}: {e}");
        headers
    };
    let h = shape(s.get("/v2/models/fmnist-simclr"), 401);
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    shape(s.client().post(format!("{}/v2/models/fmnist-simclr/versions/1/infer", s.url)).send().unwrap(), 401);
    let key = |path: &str| s.client().get(format!("{}{path}", s.url)).bearer_auth("key-one").send().unwrap();
    shape(key("/v2/nowhere"), 404);
    shape(key("/v2/models/fmnist-simclr/versions"), 404);
    shape(key("/v2/models/fmnist-simclr/infer"), 405);
    shape(key("/v2/models/nope"), 404);
    // /v1 keeps its own shape.
    let e: Value = key("/v1/nowhere").json().unwrap();
    assert_eq!(e["error"]["code"], "not_found");
    let _ = std::fs::remove_dir_all(&dir);
}
