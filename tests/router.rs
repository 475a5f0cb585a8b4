//! The router in-process, over the real engine with a fake encoder: every edge (v1, KServe v2,
//! Label Studio) translates to the one pipeline, so ordering, per-item errors, summaries, the
//! image counters and the flagged-answer observers behave the same everywhere. No ONNX Runtime,
//! no child process: `router(state)` driven with `tower::ServiceExt::oneshot`, as axum's
//! `testing` example does. The real-binary suites (tests/service.rs and the rest) stay beside it.
//!
//! The fake model has d = 8 and the calibration of `model::calibration`'s unit tests (eps 0.5,
//! D = {6}, Q-Score as the risk source, tau 0.5). The fake encoder puts a spike on feature 6 for
//! a bright image (Q = 3.5, p = 0.2: not flagged) and on feature 7, outside D, for a dark one
//! (Q = 0, p = 0.9: flagged).

use std::{
    io::{BufRead, BufReader, Cursor, Write},
    net::TcpListener,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

use axum::{body::Body, http::Request};
use base64::Engine as _;
use http_body_util::BodyExt;
use ndarray::{Array2, ArrayView4, Axis};
use qscore::{
    drift::DriftSettings,
    engine::{
        BatchSettings, Capacity, Engine, FlaggedObserver, ImageScore, Model, Registry, batch::Embedder, batch::Encoded,
        batch::Worker,
    },
    http::{AppState, RequestLimits, labelstudio::LabelStudio, router},
    image::ImageLimits,
    metrics::Metrics,
    model::{calibration::Calibration, encoder::Device, manifest::Manifest},
    risk::neighbours::Neighbours,
};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Spike on feature 6 for a bright image, on feature 7 for a dark one.
struct FakeEncoder;

impl Embedder for FakeEncoder {
    fn embed(&mut self, batch: ArrayView4<f32>) -> anyhow::Result<Encoded> {
        let mut out = Array2::zeros((batch.dim().0, 8));
        for (image, mut row) in batch.axis_iter(Axis(0)).zip(out.axis_iter_mut(Axis(0))) {
            if image.mean().unwrap_or(0.0) > 0.0 {
                row[6] = 4.0;
            } else {
                row[7] = 1.0;
            }
        }
        Ok(Encoded { embeddings: out, logits: None })
    }
}

/// Records every flagged answer it is told of.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl FlaggedObserver for Recorder {
    fn flagged(&self, id: &str, answer: &ImageScore) {
        assert_eq!(answer.likely_misclassified, Some(true));
        self.0.lock().unwrap().push(id.to_owned());
    }
}

fn calibration_json() -> Value {
    let neighbours = Neighbours::new(1, 8, &[0.0; 16], &[0, 1]);
    let (zeros, ones) = (vec![0.0_f32; 8], vec![1.0_f32; 8]);
    json!({
        "format_version": 2, "model": "toy", "epsilon": 0.5, "percentiles": [50.0, 95.0],
        "activation_frequency": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 40.0, 60.0],
        "discriminative_features": [6],
        "probe": {"classes": ["a", "b"], "mean": zeros, "scale": ones,
                  "weights": [zeros, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], "bias": [0.0, 0.0], "alpha": 1.0},
        "neighbours": neighbours,
        "risk_source": "q_score",
        "isotonic": {"x": [-4.0, -2.0, 0.0], "y": [0.1, 0.5, 0.9]}, "threshold": 0.5,
        "threshold_rule": {"rule": "max_f1"},
        "reference": {"images": 0, "flagged_rate": 0.0,
            "q_score": {"percentiles": [], "histogram": {"edges": [], "counts": []}},
            "p_misclassified": {"percentiles": [], "histogram": {"edges": [], "counts": []}}},
        "evaluation": {"seed": 0, "fit_images": 2, "select_images": 0, "test_images": 0, "probe_accuracy": 1.0,
            "error_rate": 0.0, "estimators": [], "q_score_for_correct": {"auroc": null, "auprc": null, "base_rate": 1.0},
            "p_misclassified": {"auroc": null, "auprc": null, "base_rate": 0.0},
            "flag": {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "flagged_rate": 0.0,
                     "error_rate_flagged": 0.0, "error_rate_unflagged": 0.0, "lift": null},
            "compression": {"dim": 8, "discriminative": 1, "kept_ratio": 0.125, "accuracy_all": 1.0,
                "accuracy_discriminative": 1.0, "accuracy_random": [], "accuracy_random_mean": 0.0, "accuracy_random_sd": 0.0}},
        "data": {"sources": [], "classes": ["a", "b"], "fit_per_class": [1, 1], "select_per_class": [0, 0],
                 "test_per_class": [0, 0], "file_list_sha256": "", "skipped": []}
    })
}

const MANIFEST: &str = r#"
name = "toy"
version = "1.0.0"
description = "a fake 8-feature encoder for in-process router tests"

[provenance]
source = "tests/router.rs"
weights = "none: FakeEncoder"
recipe = "none"
license = "Apache-2.0"

[input]
name = "pixel_values"
channels = 1
height = 8
width = 8

[output]
name = "embedding"
dim = 8

[preprocess]
color = "grey"
mean = [0.5]
std = [0.5]

[qscore]
epsilon = 0.5
percentiles = [50.0, 95.0]
"#;

/// The toy model folder, written as a real one is (model.toml and calibration.json).
fn toy_model(metrics: &Metrics) -> Model {
    let dir =
        std::env::temp_dir().join(format!("qscore-router-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), MANIFEST).unwrap();
    std::fs::write(dir.join("calibration.json"), calibration_json().to_string()).unwrap();
    let manifest = Manifest::load(&dir).unwrap();
    let calibration = Calibration::load(&dir, 8).unwrap();
    let settings = BatchSettings { max_batch: 8, max_delay: Duration::from_millis(1) };
    let worker = Worker::spawn("toy".into(), FakeEncoder, settings, metrics.clone()).unwrap();
    Model::new(manifest, calibration, Device::Cpu, worker).unwrap()
}

struct Harness {
    app: axum::Router,
    flagged: Arc<Recorder>,
    engine: Arc<Engine>,
}

fn harness(label_studio: Option<&str>) -> Harness {
    let metrics = Metrics::new();
    let registry = Registry::from_models(vec![toy_model(&metrics)]).unwrap();
    let capacity = Capacity {
        max_images: 64,
        timeout: Duration::from_secs(10),
        drift: DriftSettings { max_images: 100, max_age: Duration::from_secs(60) },
        memory_budget: 256 << 20,
    };
    let mut engine = Engine::from_registry(registry, ImageLimits::DEFAULT, capacity, metrics);
    let flagged = Arc::new(Recorder::default());
    engine.observe(flagged.clone());
    let engine = Arc::new(engine);
    let state = AppState {
        engine: Arc::clone(&engine),
        limits: RequestLimits { max_body_bytes: 8 << 20, max_batch_images: 16, body_timeout: Duration::from_secs(5) },
        ready: Arc::new(AtomicBool::new(true)),
        api_keys: None,
        label_studio: label_studio
            .map(|url| Arc::new(LabelStudio::new(url, None, Duration::from_secs(5), 1 << 20).unwrap())),
    };
    Harness { app: router(state, &[]), flagged, engine }
}

fn png(value: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::GrayImage::from_pixel(8, 8, image::Luma([value]))
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn call(app: &axum::Router, request: Request<Body>) -> (u16, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into())))
}

fn post_json(path: &str, body: &Value) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

fn images_total(engine: &Engine, outcome: &str) -> u64 {
    let text = engine.metrics.render();
    let prefix = format!("qscore_images_total{{model=\"toy\",outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.parse().unwrap())
}

/// A JSON batch keeps its order, answers each bad item in its slot, sums up what it answered,
/// counts every item, and tells the observers of the flagged one.
#[tokio::test(flavor = "multi_thread")]
async fn v1_batches_keep_order_errors_summaries_and_observers() {
    let h = harness(None);
    let batch = json!({"images": [
        {"id": "bright", "data": b64(&png(255))},
        {"id": "not-base64", "data": "%%%"},
        {"id": "dark", "data": b64(&png(0))},
        {"id": "text", "data": b64(b"hello, world")},
        {"id": "typed", "data": b64(&png(0)), "confidence": "0.5"},
        {"id": 6, "data": b64(&png(0))},
    ]});
    let (status, r) = call(&h.app, post_json("/v1/score/batch", &batch)).await;
    assert_eq!(status, 200, "{r}");
    let ids: Vec<&str> = r["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();
    // A malformed item keeps the client's id when it has one; an id that is no string, its position.
    assert_eq!(ids, ["bright", "not-base64", "dark", "text", "typed", "5"]);
    assert_eq!(r["results"][4]["error"]["code"], "bad_request");
    assert_eq!(r["results"][5]["error"]["code"], "bad_request");
    assert_eq!(r["results"][0]["likely_misclassified"], false);
    assert!((r["results"][0]["q_score"].as_f64().unwrap() - 3.5).abs() < 1e-6, "{r}");
    assert_eq!(r["results"][1]["error"]["code"], "bad_request");
    assert_eq!(r["results"][2]["likely_misclassified"], true);
    assert_eq!(r["results"][2]["predicted_class"], "b");
    assert_eq!(r["results"][3]["error"]["code"], "unsupported_image_format");
    assert_eq!(r["summary"], json!({"count": 6, "scored": 2, "failed": 4, "flagged": 1, "mean_q_score": 1.75}));
    assert_eq!(*h.flagged.0.lock().unwrap(), ["dark"]);
    assert_eq!((images_total(&h.engine, "scored"), images_total(&h.engine, "rejected")), (2, 4));

    let (status, r) =
        call(&h.app, Request::post("/v1/score").header("content-type", "image/png").body(Body::from(png(0))).unwrap())
            .await;
    assert_eq!((status, r["likely_misclassified"].clone()), (200, json!(true)));
    assert_eq!(h.flagged.0.lock().unwrap().len(), 2, "single-image answers reach the observers too");
}

/// KServe v2 answers columns in input order and its flagged images reach the observers, named
/// by the request id and their index.
#[tokio::test(flavor = "multi_thread")]
async fn kserve_keeps_order_and_reaches_the_observers() {
    let h = harness(None);
    let body = json!({"id": "req-7", "inputs": [{"name": "image", "shape": [3, 1], "datatype": "BYTES",
        "data": [[b64(&png(0))], [b64(&png(255))], [b64(&png(0))]]}]});
    let (status, r) = call(&h.app, post_json("/v2/models/toy/infer", &body)).await;
    assert_eq!(status, 200, "{r}");
    let column =
        |name: &str| r["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap()["data"].clone();
    assert_eq!(column("likely_misclassified"), json!([true, false, true]));
    assert_eq!(*h.flagged.0.lock().unwrap(), ["req-7/0", "req-7/2"]);

    let bad = json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(&png(0)), "%%%"]}]});
    let (status, r) = call(&h.app, post_json("/v2/models/toy/infer", &bad)).await;
    assert_eq!(status, 400, "the protocol has no per-item error: {r}");
    assert!(r["error"].as_str().unwrap().contains("image 1"), "{r}");
}

/// Serves `bytes` as a PNG at every path, for the Label Studio edge.
fn file_host(bytes: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let head = if request_line.contains("/missing") {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                )
            };
            let _ = stream.write_all(head.as_bytes());
            if !request_line.contains("/missing") {
                let _ = stream.write_all(&bytes);
            }
        }
    });
    base
}

/// `/predict` answers one prediction per task in order, per-task errors in the batch items'
/// `{code, message}` shape, counts fetch failures like any other image, scores riskiest lowest,
/// and its flagged tasks reach the observers; its own errors are our JSON.
#[tokio::test(flavor = "multi_thread")]
async fn label_studio_tasks_share_the_pipeline() {
    let host = file_host(png(0));
    let h = harness(Some(&host));
    let tasks = json!({"tasks": [
        {"id": 11, "data": {"image": "/data/upload/1/dark.png"}},
        {"id": 12, "data": {"image": "/data/upload/1/missing.png"}},
        {"id": 13, "data": {"image": "http://elsewhere.example/x.png"}},
        {"id": "fourteen", "data": {"caption": 3, "image": "/data/upload/2/dark.png"}},
    ]});
    let (status, r) = call(&h.app, post_json("/predict", &tasks)).await;
    assert_eq!(status, 200, "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert!((results[0]["score"].as_f64().unwrap() - 0.1).abs() < 1e-6, "1 - p_misclassified: {r}");
    assert_eq!(results[1]["error"]["code"], "fetch_failed");
    assert_eq!(results[2]["error"]["code"], "url_refused");
    assert!(results[3]["score"].is_number(), "{r}");
    assert_eq!(*h.flagged.0.lock().unwrap(), ["11", "fourteen"]);
    assert_eq!(images_total(&h.engine, "failed"), 1, "a fetch failure is counted");
    assert_eq!(images_total(&h.engine, "rejected"), 1, "a refused URL is counted");

    let (status, r) = call(&h.app, post_json("/predict", &json!({"tasks": "nope"}))).await;
    assert_eq!(status, 400);
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let big = json!({"tasks": [], "label_config": "x".repeat(9 << 20)});
    let (status, r) = call(&h.app, post_json("/predict", &big)).await;
    assert_eq!((status, r["error"]["code"].clone()), (413, json!("body_too_large")), "the same body limit as /v1");
}

/// Too many images is one answer on every edge, whether the list is a little past
/// `--max-batch-images` or past the parser's own cap (4,096 items): 413 `too_many_images`, which
/// tells a client to split the request, never a 400 that says the JSON is wrong.
#[tokio::test(flavor = "multi_thread")]
async fn too_many_images_is_413_on_every_edge_at_every_size() {
    let h = harness(None);
    let item = b64(&png(255));
    for n in [17, 5000] {
        let v1 = json!({"images": vec![json!({"data": item}); n]});
        let kserve =
            json!({"inputs": [{"name": "image", "shape": [n], "datatype": "BYTES", "data": vec![item.clone(); n]}]});
        let ls = json!({"tasks": vec![json!({"id": 1, "data": {"image": "/data/upload/1/a.png"}}); n]});
        for (path, body) in [("/v1/score/batch", v1), ("/v2/models/toy/infer", kserve), ("/predict", ls)] {
            let (status, r) = call(&h.app, post_json(path, &body)).await;
            assert_eq!(status, 413, "{path}, {n} items: {r}");
            // KServe's errors are its protocol's {"error": "<message>"}; ours carry the code.
            let said = if path.starts_with("/v2/") { r["error"].clone() } else { r["error"]["code"].clone() };
            let want = if path.starts_with("/v2/") {
                json!("the batch has more than 16 images (--max-batch-images); split it")
            } else {
                json!("too_many_images")
            };
            assert_eq!(said, want, "{path}, {n} items");
        }
    }
}
