//! `qscore calibrate` end to end on the committed Fashion-MNIST subset, then the server
//! answering from the calibration it wrote: the flag, the probe's class, the model's held-out
//! figures and the compressed embedding.

mod common;

use std::{path::PathBuf, process::Output};

use common::{Server, fixture, floats, root};
use serde_json::Value;

const MODEL: &str = "fmnist-simclr";

/// A models folder holding the bundled SimCLR encoder under its own name, uncalibrated.
fn models_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qscore-test-{tag}-{}", std::process::id()));
    let model = dir.join(MODEL);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&model).unwrap();
    let src = root().join("models").join(MODEL);
    std::os::unix::fs::symlink(src.join("model.onnx"), model.join("model.onnx")).unwrap();
    std::fs::copy(src.join("model.toml"), model.join("model.toml")).unwrap();
    dir
}

fn qscore(args: &[&str]) -> Output {
    common::qscore_bin().env_remove("QSCORE_MODEL").args(args).output().unwrap()
}

fn calibrate(models: &std::path::Path, extra: &[&str]) -> Output {
    let mut args = vec!["calibrate", "--models-dir", models.to_str().unwrap(), "--model", MODEL];
    args.extend_from_slice(extra);
    qscore(&args)
}

/// The piecewise-linear isotonic map of calibration.json, clipped at the ends.
fn isotonic(cal: &Value, v: f64) -> f64 {
    let (x, y) = (floats(&cal["isotonic"]["x"]), floats(&cal["isotonic"]["y"]));
    if v <= x[0] {
        return y[0];
    }
    if v >= x[x.len() - 1] {
        return y[y.len() - 1];
    }
    let i = x.iter().position(|&k| k > v).unwrap();
    y[i - 1] + (v - x[i - 1]) / (x[i] - x[i - 1]) * (y[i] - y[i - 1])
}

#[test]
fn calibrate_writes_a_deterministic_calibration_the_server_answers_from() {
    let dir = models_dir("calibrate");
    let data = fixture("fmnist");
    let data = data.to_str().unwrap();
    let flags = [
        "--data",
        data,
        "--risk-source",
        "max_softmax",
        "--neighbours",
        "5",
        "--random-subsets",
        "2",
        "--sweep-epsilon",
        "2,3",
    ];
    let out = calibrate(&dir, &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "calibrate failed:\n{stderr}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| fmnist-simclr | 50 |") && table.contains("max_softmax"), "{table}");

    let path = dir.join(MODEL).join("calibration.json");
    let first = std::fs::read(&path).unwrap();
    let cal: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(cal["format_version"], 2);
    assert_eq!(cal["risk_source"], "max_softmax");
    let e = &cal["evaluation"];
    assert_eq!(
        (e["fit_images"].as_u64(), e["select_images"].as_u64(), e["test_images"].as_u64()),
        (Some(100), Some(50), Some(50))
    );
    assert_eq!(cal["data"]["fit_per_class"], serde_json::json!(vec![10; 10]));
    assert_eq!(
        e["estimators"].as_array().unwrap().len(),
        12,
        "the seven first estimators and knn_distance, mahalanobis, doctor, sirc, stacked"
    );
    assert_eq!(e["compression"]["accuracy_random"].as_array().unwrap().len(), 2);
    assert_eq!(e["sweep"].as_array().unwrap().len(), 2);
    assert_eq!(cal["reference"]["q_score"]["percentiles"].as_array().unwrap().len(), 101);
    assert!(e["probe_accuracy"].as_f64().unwrap() > 0.5, "a probe on 100 images still beats chance by far: {e}");

    // Same data, same seed: the same bytes.
    let again = calibrate(&dir, &flags);
    assert!(again.status.success());
    assert_eq!(std::fs::read(&path).unwrap(), first, "calibration must be deterministic for a fixed seed");

    let report = qscore(&["evaluate", "--models-dir", dir.to_str().unwrap(), "--format", "json"]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report[0]["evaluation"], cal["evaluation"]);

    let s = Server::start_with_models(&dir, &["--model", MODEL]);
    let info: Value = s.get(&format!("/v1/models/{MODEL}")).json().unwrap();
    assert_eq!(info["calibrated"], true);
    assert_eq!(info["calibration"]["risk_source"], "max_softmax");
    assert_eq!(info["calibration"]["evaluation"], cal["evaluation"], "the model's held-out figures are served");
    assert_eq!(info["qscore"]["epsilon"], cal["epsilon"]);

    let classes: Vec<String> = serde_json::from_value(cal["probe"]["classes"].clone()).unwrap();
    let d: Vec<usize> = serde_json::from_value(cal["discriminative_features"].clone()).unwrap();
    let eps = cal["epsilon"].as_f64().unwrap();
    let tau = cal["threshold"].as_f64().unwrap();
    let mut flagged = 0;
    for class in ["bag", "coat", "shirt", "sneaker", "trouser"] {
        let dir = fixture(&format!("fmnist/{class}"));
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for path in files.iter().take(4) {
            let bytes = std::fs::read(path).unwrap();
            let r: Value = s.post_image("/v1/embed", "x.png", bytes.clone()).json().unwrap();
            assert_eq!(r["calibrated"], true);
            assert_eq!(r["risk_source"], "max_softmax");
            assert!(classes.contains(&r["predicted_class"].as_str().unwrap().to_owned()), "{r}");

            // Q-Score with the calibrated D and eps, recomputed from the embedding.
            let h = floats(&r["embedding"]);
            let mu = h.iter().sum::<f64>() / h.len() as f64;
            let sigma = (h.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (h.len() - 1) as f64).sqrt();
            let in_ld: Vec<f64> = d.iter().map(|&j| h[j]).filter(|&v| v > mu + eps * sigma).collect();
            let q = if in_ld.is_empty() { 0.0 } else { in_ld.iter().map(|v| v - mu).sum::<f64>() / in_ld.len() as f64 };
            let answered = r["q_score"].as_f64().unwrap();
            assert!((answered - q).abs() <= 1e-4 * q.abs().max(1e-3), "{}: {answered} vs {q}", path.display());

            // p_misclassified = isotonic(1 - max softmax), flag = p >= tau.
            let p = isotonic(&cal, 1.0 - r["class_probability"].as_f64().unwrap());
            let served = r["p_misclassified"].as_f64().unwrap();
            assert!((served - p).abs() < 1e-5, "{}: {served} vs {p}", path.display());
            assert_eq!(r["likely_misclassified"], served >= tau);
            flagged += usize::from(served >= tau);

            // The compressed embedding is h restricted to D, and says so.
            let c: Value = s.post_image("/v1/embed?compressed=true", "x.png", bytes).json().unwrap();
            assert_eq!(c["embedding_features"], serde_json::json!(d));
            let kept = floats(&c["embedding"]);
            assert_eq!(kept.len(), d.len());
            for (v, &j) in kept.iter().zip(&d) {
                assert!((v - h[j]).abs() < 1e-6);
            }
        }
    }
    assert!(flagged < 20, "tau must not flag everything");
    drop(s);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn calibrate_refuses_what_it_cannot_use() {
    let dir = models_dir("calibrate-bad");
    let no_model = qscore(&["calibrate", "--models-dir", dir.to_str().unwrap(), "--data", "tests/fixtures/fmnist"]);
    assert!(String::from_utf8_lossy(&no_model.stderr).contains("--model is required"));

    let one_class = fixture("fmnist/bag");
    let e = calibrate(&dir, &["--data", one_class.to_str().unwrap()]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("class folders"), "{}", String::from_utf8_lossy(&e.stderr));

    let data = fixture("fmnist");
    let e = calibrate(&dir, &["--data", data.to_str().unwrap(), "--fit-fraction", "1.5"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("--fit-fraction must lie strictly between 0 and 1"));

    let e = calibrate(&dir, &["--data", data.to_str().unwrap(), "--target-precision", "1.01"]);
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("no threshold reaches precision"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );

    // A stale calibration.json from an older build stops the server with what to do, but never
    // stops `qscore calibrate` from writing a new one.
    let path = dir.join(MODEL).join("calibration.json");
    std::fs::write(&path, r#"{"format_version": 1, "epsilon": 4.0}"#).unwrap();
    let serve = common::qscore_bin()
        .args(["serve", "--port", "0", "--models-dir"])
        .arg(&dir)
        .env_remove("QSCORE_MODEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(
        !serve.status.success() && err.contains("format_version 1") && err.contains("re-run `qscore calibrate`"),
        "{err}"
    );
    let ok = calibrate(&dir, &["--data", data.to_str().unwrap(), "--random-subsets", "1"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn compressed_embedding_needs_a_calibration() {
    let s = Server::start(&[]);
    let r = s.post_image("/v1/embed?compressed=true", "chelsea.png", common::read("photos/chelsea.png"));
    assert_eq!(r.status(), 400);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "not_calibrated");
    assert!(body["error"]["message"].as_str().unwrap().contains("qscore calibrate --model mobilenet_v2-imagenet"));
}
