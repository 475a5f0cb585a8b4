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
        "qscore_queue_wait_seconds_count{model=\"mobilenet_v2-imagenet\"} 2",
        "qscore_preprocess_duration_seconds_count{model=\"mobilenet_v2-imagenet\"} 2",
        "qscore_rejected_images_total{model=\"mobilenet_v2-imagenet\",reason=\"invalid\"} 1",
        "qscore_model_info{calibration_sha256=\"\",device=\"cpu\",model=\"mobilenet_v2-imagenet\",version=\"1.0.0\"} 1",
        "qscore_model_load_failing{model=\"mobilenet_v2-imagenet\"} 0",
        "qscore_queue_depth{model=\"mobilenet_v2-imagenet\"} 0",
        "qscore_images_in_flight 0",
        "qscore_http_requests_in_flight 1",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert!(text.contains("qscore_http_request_duration_seconds_bucket{route=\"/v1/score\",le=\"0.5\"}"));
    assert!(text.contains(&format!("qscore_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
}

/// The shipped alerting rules pass `promtool check rules`, the Prometheus config loads them,
/// the Grafana dashboard is JSON with a query per panel, and every qscore metric either one
/// names is one the server exports.
#[test]
fn alert_rules_and_dashboard_use_real_metrics() {
    let deploy = root().join("deploy");
    for args in [["check", "rules", "prometheus/alerts.yml"], ["check", "config", "prometheus/prometheus.yml"]] {
        let out = std::process::Command::new("promtool").args(args).current_dir(&deploy).output().unwrap();
        assert!(out.status.success(), "promtool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rules = std::fs::read_to_string(deploy.join("prometheus/alerts.yml")).unwrap();
    let dashboard_text = std::fs::read_to_string(deploy.join("grafana/qscore.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard_text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for p in panels {
        assert!(!p["targets"].as_array().unwrap().is_empty(), "panel {} has no query", p["title"]);
    }

    let s = Server::start(&["--model", "fmnist-simclr"]);
    assert_eq!(s.post_raw("/v1/score", "image/png", read("fmnist/bag/t10k-00030.png")).status(), 200);
    assert_eq!(s.post_raw("/v1/score", "image/jpeg", read("bad/truncated.jpg")).status(), 422);
    let exported = s.get("/metrics").text().unwrap();
    let names = |text: &str| -> std::collections::BTreeSet<String> {
        // `level:metric:operation` words are recording rules' outputs, not exported metrics.
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.starts_with("qscore_") && !w.contains(':'))
            .map(|w| w.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count").to_owned())
            .collect()
    };
    let exported = names(&exported);
    // The embedding test's statistic and p-value are exported once it has been computed: from
    // the window's minimum of embeddings on, which one image does not reach.
    let drift: Value = s.get("/v1/drift?model=fmnist-simclr").json().unwrap();
    let computed = drift["models"][0]["embedding"]["status"] == "ok";
    for name in names(&rules).into_iter().chain(names(&dashboard_text)) {
        if !computed && matches!(name.as_str(), "qscore_drift_embedding_mmd2" | "qscore_drift_embedding_p_value") {
            continue;
        }
        assert!(exported.contains(&name), "`{name}` is used in deploy/ but not exported");
    }
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
    for path in [
        "/v1/score",
        "/v1/score/batch",
        "/v1/embed",
        "/v1/explain",
        "/v1/models",
        "/v1/models/{name}",
        "/health/ready",
        "/metrics",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} is not documented");
    }
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

    let device = common::qscore_bin().args(["serve", "--device", "gpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&device.stderr).contains("use cpu, cuda or cuda:N"));

    // CUDA settings on the CPU would do nothing: refused, naming each flag and its variable.
    let cuda_flags =
        start_fails(&models, &["--cuda-memory-limit-bytes", "1000000", "--cudnn-conv-algo-search", "heuristic"]);
    assert!(
        cuda_flags.contains("--cuda-memory-limit-bytes (QSCORE_CUDA_MEMORY_LIMIT_BYTES)")
            && cuda_flags.contains("--cudnn-conv-algo-search")
            && cuda_flags.contains("only apply to --device cuda")
            && cuda_flags.ends_with("or unset them\n"),
        "{cuda_flags}"
    );
    let one = start_fails(&models, &["--cudnn-conv-algo-search", "heuristic"]);
    assert!(one.contains("only applies to --device cuda") && one.ends_with("or unset it\n"), "{one}");
    let bad = common::qscore_bin().args(["serve", "--cudnn-conv-algo-search", "fastest"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("[possible values: exhaustive, heuristic, default]"));

    // An fp16 model (models-fp16/, made for CUDA) on the CPU: refused with the reason, not
    // served at half speed.
    let dir = std::env::temp_dir().join(format!("qscore-fp16-on-cpu-{}", std::process::id()));
    let model = dir.join("fmnist-simclr");
    std::fs::create_dir_all(&model).unwrap();
    let manifest = std::fs::read_to_string(models.join("fmnist-simclr/model.toml")).unwrap();
    let manifest = manifest.replacen("\n[provenance]", "precision = \"fp16\"\n\n[provenance]", 1);
    std::fs::write(model.join("model.toml"), manifest).unwrap();
    std::fs::copy(models.join("fmnist-simclr/model.onnx"), model.join("model.onnx")).unwrap();
    let fp16 = start_fails(&dir, &[]);
    assert!(fp16.contains("precision = \"fp16\"") && fp16.contains("--device cuda"), "{fp16}");
    std::fs::remove_dir_all(dir).unwrap();
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

/// schemathesis (PyPI, installed into .venv-test by `make tools`) generates requests from the
/// served OpenAPI document: no answer may be a 5xx or break the documented schema.
#[test]
fn schemathesis_finds_no_server_error_and_no_schema_break() {
    let st = root().join(".venv-test/bin/st");
    assert!(st.exists(), "{} is missing: run `make tools` (make test does)", st.display());
    let s = Server::start(&[]);
    let out = std::process::Command::new(st)
        .args(["run", &format!("{}/openapi.json", s.url)])
        .args(["--checks", "not_a_server_error,response_schema_conformance", "--max-examples", "25", "--seed", "1"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "schemathesis found problems:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("passed") && !report.contains("failed"), "{report}");
    s.assert_ready();
}

/// Found by a hostile client: a request followed by shutdown(SHUT_WR) (`nc -N`, socat, some
/// proxies) was often answered with nothing. It is answered every time, and a client that
/// half-closes and then never reads is still dropped after `--send-timeout-ms`.
#[test]
fn half_closed_clients_are_answered() {
    use std::{
        io::{Read, Write},
        net::{Shutdown, TcpStream},
        time::{Duration, Instant},
    };
    // One client address fills every slot: its own cap is the total.
    let s =
        Server::start(&["--send-timeout-ms", "1000", "--max-connections", "4", "--max-connections-per-client", "4"]);
    let addr = s.url.trim_start_matches("http://").to_owned();
    for i in 0..50 {
        let (path, version) = [("/health/live", "1.0"), ("/openapi.json", "1.1"), ("/v1/models", "1.0")][i % 3];
        let mut c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let close = if version == "1.1" { "Connection: close\r\n" } else { "" };
        c.write_all(format!("GET {path} HTTP/{version}\r\nHost: x\r\n{close}\r\n").as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with(&format!("HTTP/{version} 200")),
            "try {i}, {path}: {} bytes: {text:.80}",
            answer.len()
        );
        let body = text.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str::<Value>(body).unwrap_or_else(|e| panic!("try {i}, {path}: {e}"));
    }
    // Every slot held by a client that half-closes after a pipeline of requests and never reads
    // its answers: each is dropped once a write stalls for the send timeout.
    let request = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let silent: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = c.write_all(request.as_bytes());
            let _ = c.shutdown(Shutdown::Write);
            c
        })
        .collect();
    let t = Instant::now();
    s.assert_ready();
    assert!(t.elapsed() < Duration::from_secs(8), "the probe waited {:?} behind half-closed readers", t.elapsed());
    drop(silent);
}
