//! The service around the scoring: metrics, OpenAPI, calibration files, start-up and shutdown.

mod common;

use std::process::Stdio;

use common::{Server, read, root};
use serde_json::Value;

#[test]
fn metrics_are_valid_prometheus_text() {
    let s = Server::start(&[]);
    for photo in ["china.jpg", "rocket.jpg"] {
        assert_eq!(s.post_image("/v1/score", photo, read(&format!("photos/{photo}"))).status(), 200);
    }
    assert_eq!(s.post_image("/v1/score", "t.jpg", read("bad/truncated.jpg")).status(), 422);
    assert_eq!(s.get("/v1/models/nope").status(), 404);
    let r = s.get("/metrics");
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = r.text().unwrap();

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed for this test: `make tools` installs it (Debian package prometheus)");
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}\n{text}");

    for line in [
        "qscore_images_total{model=\"mobilenet_v2-imagenet\",outcome=\"scored\"} 2",
        "qscore_images_total{model=\"mobilenet_v2-imagenet\",outcome=\"rejected\"} 1",
        "qscore_http_requests_total{route=\"/v1/score\",status=\"2xx\"} 2",
        "qscore_http_requests_total{route=\"/v1/score\",status=\"4xx\"} 1",
        "qscore_http_requests_total{route=\"/v1/models/{name}\",status=\"4xx\"} 1",
        "qscore_score_count{model=\"mobilenet_v2-imagenet\"} 2",
        "qscore_inference_duration_seconds_count{model=\"mobilenet_v2-imagenet\"} 2",
        "qscore_batch_size_count{model=\"mobilenet_v2-imagenet\"} 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(text.contains("qscore_http_request_duration_seconds_bucket{route=\"/v1/score\",le=\"0.5\"}"));
}

#[test]
fn openapi_document_matches_the_code() {
    let out = common::qscore_bin().arg("openapi").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(root().join("openapi/openapi.json")).unwrap();
    assert!(
        generated == committed,
        "openapi/openapi.json is stale: run `make openapi` (or `qscore openapi > openapi/openapi.json`) and commit it"
    );
    let s = Server::start(&[]);
    let served: Value = s.get("/openapi.json").json().unwrap();
    assert_eq!(served, serde_json::from_str::<Value>(&committed).unwrap());
    for path in
        ["/v1/score", "/v1/score/batch", "/v1/embed", "/v1/models", "/v1/models/{name}", "/health/ready", "/metrics"]
    {
        assert!(served["paths"].get(path).is_some(), "{path} is not documented");
    }
}

/// A models folder holding the bundled model under its own name, with `calibration`.
fn calibrated_models(tag: &str, calibration: &Value) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("qscore-test-{tag}-{}", std::process::id()));
    let model = dir.join("mobilenet_v2-imagenet");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&model).unwrap();
    let src = root().join("models/mobilenet_v2-imagenet");
    std::os::unix::fs::symlink(src.join("model.onnx"), model.join("model.onnx")).unwrap();
    std::fs::copy(src.join("model.toml"), model.join("model.toml")).unwrap();
    std::fs::write(model.join("calibration.json"), calibration.to_string()).unwrap();
    dir
}

/// D = {414, 596, 549, 677}: features that fire on the cat (chelsea) and not on the
/// palace (china), whose only active feature is 783. The isotonic map falls from p = 0.9 at
/// Q = 0 to p = 0.1 at Q = 3; tau = 0.5.
fn calibration() -> Value {
    serde_json::json!({
        "format_version": 1, "epsilon": 4.0, "percentiles": [50.0, 95.0],
        "discriminative_features": [414, 549, 596, 677], "risk_source": "q_score",
        "isotonic": {"x": [0.0, 3.0], "y": [0.9, 0.1]}, "threshold": 0.5
    })
}

#[test]
fn a_calibrated_model_answers_the_flag_from_its_calibration() {
    let dir = calibrated_models("cal", &calibration());
    let s = Server::start_with_models(&dir, &[]);
    let info: Value = s.get("/v1/models/mobilenet_v2-imagenet").json().unwrap();
    assert_eq!(info["calibrated"], true);
    assert_eq!(info["calibration"]["risk_source"], "q_score");
    assert_eq!(info["calibration"]["discriminative_features"], 4);

    let d = [414_usize, 549, 596, 677];
    for (photo, flagged) in [("chelsea.png", false), ("china.jpg", true)] {
        let r: Value = s.post_image("/v1/embed", photo, read(&format!("photos/{photo}"))).json().unwrap();
        assert_eq!(r["calibrated"], true);
        assert_eq!(r["risk_source"], "q_score");
        let h = common::floats(&r["embedding"]);
        let mu = h.iter().sum::<f64>() / h.len() as f64;
        let sigma = (h.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (h.len() - 1) as f64).sqrt();
        let in_ld: Vec<f64> = d.iter().map(|&j| h[j]).filter(|&v| v > mu + 4.0 * sigma).collect();
        let q = if in_ld.is_empty() { 0.0 } else { in_ld.iter().map(|v| v - mu).sum::<f64>() / in_ld.len() as f64 };
        let answered = r["q_score"].as_f64().unwrap();
        assert!((answered - q).abs() <= 1e-4 * q.abs().max(1e-6), "{photo}: {answered} vs {q}");
        assert_eq!(r["stats"]["active_discriminative"].as_u64().unwrap() as usize, in_ld.len());
        assert!(r["stats"]["active"].as_u64() >= r["stats"]["active_discriminative"].as_u64());
        for f in r["discriminative_features"].as_array().unwrap() {
            assert!(d.contains(&(f["index"].as_u64().unwrap() as usize)), "{f} is not in D");
        }
        let p = 0.9 - 0.8 * (q / 3.0).min(1.0);
        assert!((r["p_misclassified"].as_f64().unwrap() - p).abs() < 1e-5, "{photo}: {r}");
        assert_eq!(r["likely_misclassified"], flagged, "{photo}: p = {p}");
    }

    let form = reqwest::blocking::multipart::Form::new()
        .part("image", reqwest::blocking::multipart::Part::bytes(read("photos/china.jpg")).file_name("china.jpg"))
        .part("image", reqwest::blocking::multipart::Part::bytes(read("photos/chelsea.png")).file_name("chelsea.png"));
    let b: Value = s.client().post(format!("{}/v1/score/batch", s.url)).multipart(form).send().unwrap().json().unwrap();
    assert_eq!(b["summary"]["flagged"], 1);
    drop(s);
    std::fs::remove_dir_all(dir).unwrap();
}

fn start_fails(models: &std::path::Path, args: &[&str]) -> String {
    let out = common::qscore_bin()
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--models-dir"])
        .arg(models)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "qscore started with {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "a start-up error must not panic:\n{stderr}");
    stderr
}

#[test]
fn start_up_errors_say_what_to_do() {
    let models = root().join("models");
    let cuda = start_fails(&models, &["--device", "cuda"]);
    assert!(cuda.contains("CUDA execution provider could not register") && cuda.contains("--device cpu"), "{cuda}");

    let missing = start_fails(&models, &["--ort-lib", "/nonexistent/libonnxruntime.so"]);
    assert!(missing.contains("ONNX Runtime library not found") && missing.contains("make ort"), "{missing}");

    let unknown = start_fails(&models, &["--model", "resnet-9000"]);
    assert!(unknown.contains("--model resnet-9000") && unknown.contains("mobilenet_v2-imagenet"), "{unknown}");

    let mut bad = calibration();
    bad["discriminative_features"] = serde_json::json!([1, 5000]);
    let dir = calibrated_models("badcal", &bad);
    let e = start_fails(&dir, &[]);
    assert!(e.contains("calibration.json") && e.contains("index 5000"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();

    let device = common::qscore_bin().args(["serve", "--device", "gpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&device.stderr).contains("use cpu, cuda or cuda:N"));
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let s = Server::start(&[]);
    s.assert_ready();
    let status = s.terminate();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn help_documents_every_flag_with_its_variable() {
    let out = common::qscore_bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--host",
        "--port",
        "--models-dir",
        "--model",
        "--ort-lib",
        "--device",
        "--max-image-pixels",
        "--max-body-bytes",
        "--max-batch-images",
        "--max-batch",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let flags = help
        .lines()
        .filter(|l| l.trim_start().starts_with("--") && !l.contains("--help") && !l.contains("--version"))
        .count();
    assert_eq!(help.matches("[env: QSCORE_").count(), flags, "every flag names its QSCORE_* variable:\n{help}");
}
