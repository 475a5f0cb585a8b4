//! The flag for the user's own classifier: `qscore calibrate --predictions FILE`, a model whose
//! ONNX file carries its own classifier head, and the client's confidence per image. Each test
//! runs the real binary on the committed Fashion-MNIST subset (20 t10k images per class) and
//! the real server on a real port.

mod common;

use std::{
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    process::Output,
};

use common::{Server, assert_error, fixture, root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MODEL: &str = "fmnist-simclr";

/// A fresh models folder under the temp dir.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qscore-user-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The bundled SimCLR encoder, uncalibrated, as `name` under `dir`.
fn add_encoder(dir: &Path, name: &str) {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).unwrap();
    let src = root().join("models").join(MODEL);
    std::os::unix::fs::symlink(src.join("model.onnx"), model.join("model.onnx")).unwrap();
    let toml = std::fs::read_to_string(src.join("model.toml")).unwrap();
    std::fs::write(
        model.join("model.toml"),
        toml.replacen(&format!("name = \"{MODEL}\""), &format!("name = \"{name}\""), 1),
    )
    .unwrap();
}

fn qscore(args: &[&str]) -> Output {
    common::qscore_bin().env_remove("QSCORE_MODEL").args(args).output().unwrap()
}

fn calibrate(models: &Path, model: &str, extra: &[&str]) -> Output {
    let data = fixture("fmnist");
    let mut args = vec!["calibrate", "--models-dir", models.to_str().unwrap(), "--model", model];
    args.extend_from_slice(&["--data", data.to_str().unwrap(), "--neighbours", "5", "--random-subsets", "2"]);
    args.extend_from_slice(extra);
    qscore(&args)
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "calibrate failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn failed_saying(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(what), "expected a failure saying {what:?}:\n{stderr}");
}

/// Every fixture image as (`<class>/<file>`, class).
fn fixture_images() -> Vec<(String, String)> {
    let mut images = Vec::new();
    for class in std::fs::read_dir(fixture("fmnist")).unwrap() {
        let class = class.unwrap().file_name().into_string().unwrap();
        for file in std::fs::read_dir(fixture("fmnist").join(&class)).unwrap() {
            images.push((format!("{class}/{}", file.unwrap().file_name().into_string().unwrap()), class.clone()));
        }
    }
    images.sort();
    images
}

fn calibration(models: &Path, model: &str) -> Value {
    serde_json::from_slice(&std::fs::read(models.join(model).join("calibration.json")).unwrap()).unwrap()
}

/// A user's classifier that is right except on shirts, which it calls T-shirts: its error rate
/// on every stratified part is exactly the shirts' share, 10%, whatever qscore's probe does. A
/// calibration that still measured the probe's mistakes would report the probe's rate instead.
#[test]
fn a_predictions_file_defines_what_misclassified_means() {
    let dir = scratch("predictions");
    add_encoder(&dir, MODEL);
    let mut csv = String::from("path,label,predicted\n");
    for (path, class) in fixture_images() {
        let predicted = if class == "shirt" { "tshirt_top" } else { class.as_str() };
        csv.push_str(&format!("{path},{class},{predicted}\n"));
    }
    let file = dir.join("predictions.csv");
    std::fs::write(&file, &csv).unwrap();

    let out = calibrate(&dir, MODEL, &["--predictions", file.to_str().unwrap()]);
    succeeded(&out);
    let cal = calibration(&dir, MODEL);
    let sha: String = Sha256::digest(csv.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        cal["target"],
        json!({"classifier": "predictions", "file": file.to_str().unwrap(), "sha256": sha, "with_confidence": false})
    );
    assert_eq!(cal["evaluation"]["error_rate"], 0.1, "the user's classifier is wrong on the 5 test shirts of 50");
    let base = cal["evaluation"]["p_misclassified"]["base_rate"].as_f64().unwrap();
    assert_eq!(base, 0.1);

    // Served: GET /v1/models says whose mistakes the flag predicts.
    let server = Server::start_with_models(&dir, &["--model", MODEL]);
    let info: Value = server.get(&format!("/v1/models/{MODEL}")).json().unwrap();
    assert_eq!(info["calibration"]["target"]["classifier"], "predictions");
    assert_eq!(info["calibration"]["target"]["sha256"], sha.as_str());
    assert_eq!(info["calibration"]["needs_confidence"], false);
    drop(server);

    // --out replaces only a regular file: never a device or a folder (run as root, a rename
    // over /dev/null replaced the device).
    for out in ["/dev/null", dir.to_str().unwrap()] {
        failed_saying(
            &calibrate(&dir, MODEL, &["--predictions", file.to_str().unwrap(), "--out", out]),
            "not a regular file",
        );
    }
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device() || cfg!(not(unix)));

    // Every mismatch between the file and the images is an error naming the line.
    let rows: Vec<&str> = csv.lines().collect();
    for (broken, says) in [
        (rows[..rows.len() - 1].join("\n"), "has no row"),
        (format!("{csv}extra/none.png,shirt,shirt\n"), &format!("line {}: no image", rows.len() + 1) as &str),
        (csv.replacen(",tshirt_top\n", ",t-shirt\n", 1), "is not a class folder"),
        (format!("{csv}{}\n", rows[1]), "same image as line 2"),
        ("file,class\n".to_string(), "must name the columns `path` and `predicted`"),
    ] {
        let bad = dir.join("bad.csv");
        std::fs::write(&bad, broken).unwrap();
        failed_saying(&calibrate(&dir, MODEL, &["--predictions", bad.to_str().unwrap()]), says);
    }
}

/// A model whose ONNX file also outputs classifier logits (made by
/// `models/recipes/add_classifier_head.py` from the bundled calibration's probe, so the head's
/// classes must be the probe's): it answers `predicted_class` from its head, and calibration
/// takes that head as the classifier without a predictions file.
#[test]
fn a_model_head_answers_the_class_and_is_what_calibration_predicts() {
    let dir = scratch("head");
    let head = dir.join("fmnist-simclr-head");
    let made = std::process::Command::new(root().join(".venv-test/bin/python"))
        .arg(root().join("models/recipes/add_classifier_head.py"))
        .args(["--model", root().join("models").join(MODEL).to_str().unwrap(), "--out", head.to_str().unwrap()])
        .output()
        .expect("run `make tools` for .venv-test");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // The bundled, calibrated encoder beside it: its probe answers the class the head must.
    let bundled = dir.join(MODEL);
    std::fs::create_dir_all(&bundled).unwrap();
    for f in ["model.onnx", "model.toml", "calibration.json"] {
        std::os::unix::fs::symlink(root().join("models").join(MODEL).join(f), bundled.join(f)).unwrap();
    }

    let server = Server::start_with_models(&dir, &["--model", MODEL]);
    let images = fixture_images();
    let mut agree = 0;
    for (path, _) in &images {
        let bytes = std::fs::read(fixture("fmnist").join(path)).unwrap();
        let by_head: Value =
            server.post_raw("/v1/score?model=fmnist-simclr-head", "image/png", bytes.clone()).json().unwrap();
        let by_probe: Value = server.post_raw(&format!("/v1/score?model={MODEL}"), "image/png", bytes).json().unwrap();
        assert_eq!(by_head["calibrated"], false);
        assert!(by_head["class_probability"].as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)), "{by_head}");
        agree += usize::from(by_head["predicted_class"] == by_probe["predicted_class"]);
    }
    // The head computes in f32 inside ONNX Runtime, the probe in f64: only a near-tie may differ.
    assert!(
        agree + 2 >= images.len(),
        "the head agrees with the probe it was made from on {agree} of {}",
        images.len()
    );
    let info: Value = server.get("/v1/models/fmnist-simclr-head").json().unwrap();
    assert_eq!(info["classifier"]["output"], "logits");
    drop(server);

    let out = calibrate(&dir, "fmnist-simclr-head", &[]);
    succeeded(&out);
    let cal = calibration(&dir, "fmnist-simclr-head");
    assert_eq!(cal["target"]["classifier"], "model_head");
    assert_eq!(cal["target"]["output"], "logits");
    let csv = dir.join("p.csv");
    std::fs::write(&csv, "path,predicted\n").unwrap();
    failed_saying(
        &calibrate(&dir, "fmnist-simclr-head", &["--predictions", csv.to_str().unwrap()]),
        "has its own classifier head",
    );

    // A head's calibration belongs to that head: beside an encoder without it, or with its
    // classes reordered, the server refuses to start instead of flagging by the wrong numbers.
    let plain = scratch("head-plain");
    add_encoder(&plain, MODEL);
    std::fs::copy(dir.join("fmnist-simclr-head/calibration.json"), plain.join(MODEL).join("calibration.json")).unwrap();
    let refused = qscore(&["serve", "--models-dir", plain.to_str().unwrap(), "--port", "0"]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("model.toml has no [classifier]"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let server = Server::start_with_models(&dir, &["--model", MODEL]);
    let bytes = std::fs::read(fixture("fmnist").join(&images[0].0)).unwrap();
    let answer: Value = server.post_raw("/v1/score?model=fmnist-simclr-head", "image/png", bytes).json().unwrap();
    assert_eq!(answer["calibrated"], true);
    assert!(answer["p_misclassified"].as_f64().is_some(), "{answer}");
    let info: Value = server.get("/v1/models/fmnist-simclr-head").json().unwrap();
    assert_eq!(info["calibration"]["target"]["classifier"], "model_head");
    assert_eq!(info["calibration"]["needs_confidence"], false, "the head gives its own confidence");
}

/// A user's classifier that gives its confidence: low on the shirts it gets wrong, high
/// elsewhere except on every seventh image. Calibrated on that confidence, the server needs it
/// per image in every protocol, answers 400 `missing_confidence` without it (a batch item in
/// its own slot), and flags a low confidence, not a high one.
#[test]
fn a_flag_on_the_clients_confidence_needs_it_in_every_protocol() {
    let dir = scratch("confidence");
    add_encoder(&dir, MODEL);
    let mut csv = String::from("path,predicted,confidence\n");
    for (i, (path, class)) in fixture_images().into_iter().enumerate() {
        let (predicted, confidence) = match (class.as_str(), i % 7) {
            ("shirt", _) => ("tshirt_top", 0.35 + (i % 5) as f64 * 0.05),
            (_, 0) => (class.as_str(), 0.55),
            _ => (class.as_str(), 0.8 + (i % 4) as f64 * 0.05),
        };
        csv.push_str(&format!("{path},{predicted},{confidence}\n"));
    }
    let file = dir.join("predictions.csv");
    std::fs::write(&file, &csv).unwrap();
    succeeded(&calibrate(&dir, MODEL, &["--predictions", file.to_str().unwrap(), "--risk-source", "user_confidence"]));
    let cal = calibration(&dir, MODEL);
    assert_eq!(cal["target"]["with_confidence"], true);
    assert_eq!(cal["risk_source"], "user_confidence");

    let server = Server::start_with_models(&dir, &["--model", MODEL]);
    let info: Value = server.get(&format!("/v1/models/{MODEL}")).json().unwrap();
    assert_eq!(info["calibration"]["needs_confidence"], true);
    let png = std::fs::read(fixture("fmnist").join(&fixture_images()[0].0)).unwrap();

    let missing = assert_error(server.post_raw("/v1/score", "image/png", png.clone()), 400, "missing_confidence");
    assert!(missing["error"]["message"].as_str().unwrap().contains("`confidence`"), "{missing}");
    assert_error(server.post_image("/v1/score", "a.png", png.clone()), 400, "missing_confidence");
    assert_error(server.post_raw("/v1/score?confidence=1.5", "image/png", png.clone()), 400, "invalid_confidence");
    assert_error(server.post_raw("/v1/score?confidence=high", "image/png", png.clone()), 400, "invalid_confidence");

    let low: Value = server.post_raw("/v1/score?confidence=0.3", "image/png", png.clone()).json().unwrap();
    let high: Value = server.post_raw("/v1/score?confidence=0.99", "image/png", png.clone()).json().unwrap();
    assert_eq!((&low["likely_misclassified"], &high["likely_misclassified"]), (&json!(true), &json!(false)));
    assert!(low["p_misclassified"].as_f64() > high["p_misclassified"].as_f64(), "{low} {high}");

    // A form field, per image in a batch, in the order of the images.
    let part = |name: &str| reqwest::blocking::multipart::Part::bytes(png.clone()).file_name(name.to_owned());
    let form = reqwest::blocking::multipart::Form::new().part("image", part("a.png")).text("confidence", "0.3");
    let url = |path: &str| format!("{}{path}", server.url);
    let by_form: Value = server.client().post(url("/v1/score")).multipart(form).send().unwrap().json().unwrap();
    assert_eq!(by_form["p_misclassified"], low["p_misclassified"]);
    let form = reqwest::blocking::multipart::Form::new()
        .part("image", part("a.png"))
        .part("image", part("b.png"))
        .text("confidence", "0.99")
        .text("confidence", "0.3");
    let batch: Value = server.client().post(url("/v1/score/batch")).multipart(form).send().unwrap().json().unwrap();
    assert_eq!(batch["results"][0]["p_misclassified"], high["p_misclassified"]);
    assert_eq!(batch["results"][1]["p_misclassified"], low["p_misclassified"]);
    let form = reqwest::blocking::multipart::Form::new()
        .part("image", part("a.png"))
        .part("image", part("b.png"))
        .text("confidence", "0.3");
    assert_error(server.client().post(url("/v1/score/batch")).multipart(form).send().unwrap(), 400, "bad_request");

    // A JSON batch: an item without it fails alone.
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = json!({"images": [
        {"id": "with", "data": data, "confidence": 0.3},
        {"id": "without", "data": data},
        {"id": "bad", "data": data, "confidence": -0.1},
    ]});
    let batch: Value = server.client().post(url("/v1/score/batch")).json(&body).send().unwrap().json().unwrap();
    assert_eq!(batch["results"][0]["p_misclassified"], low["p_misclassified"]);
    assert_eq!(batch["results"][1]["error"]["code"], "missing_confidence");
    assert_eq!(batch["results"][2]["error"]["code"], "invalid_confidence");

    // KServe v2: a `confidence` input beside `image`, listed in the model's metadata.
    let meta: Value = server.get(&format!("/v2/models/{MODEL}")).json().unwrap();
    assert_eq!(meta["inputs"][1]["name"], "confidence");
    let infer = |inputs: Value| {
        server.client().post(url(&format!("/v2/models/{MODEL}/infer"))).json(&json!({"inputs": inputs})).send().unwrap()
    };
    let image = json!({"name": "image", "shape": [2], "datatype": "BYTES", "data": [data, data]});
    let answer: Value =
        infer(json!([image, {"name": "confidence", "shape": [2], "datatype": "FP32", "data": [0.3, 0.99]}]))
            .json()
            .unwrap();
    let flags = answer["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "likely_misclassified").unwrap();
    assert_eq!(flags["data"], json!([true, false]));
    let refused = infer(json!([image]));
    assert_eq!(refused.status(), 400);
    let text = refused.text().unwrap();
    assert!(text.contains("confidence"), "{text}");

    // Label Studio: the task's `data.confidence`, a number (JSON import) or its text (CSV
    // import); a task without it fails alone. Label Studio's score is 1 - risk.
    let uri = format!("data:image/png;base64,{data}");
    let tasks = json!({"tasks": [
        {"id": 1, "data": {"image": uri, "confidence": 0.3}},
        {"id": 2, "data": {"image": uri, "confidence": "0.99"}},
        {"id": 3, "data": {"image": uri}},
        {"id": 4, "data": {"image": uri, "confidence": "high"}},
    ]});
    let ls: Value = server.client().post(url("/predict")).json(&tasks).send().unwrap().json().unwrap();
    let r = &ls["results"];
    let score = |v: &Value| 1.0 - v["p_misclassified"].as_f64().unwrap();
    assert!((r[0]["score"].as_f64().unwrap() - score(&low)).abs() < 1e-6, "{ls}");
    assert!((r[1]["score"].as_f64().unwrap() - score(&high)).abs() < 1e-6, "{ls}");
    assert_eq!(r[2]["error"]["code"], "missing_confidence", "{ls}");
    assert_eq!(r[3]["error"]["code"], "invalid_confidence", "{ls}");
}
