//! Production behaviour on a real server over loopback: floods, slow clients, draining on
//! SIGTERM, API keys and their rotation, dynamic batching, and drift monitoring. Every test is
//! bounded in time and in requests.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use common::{
    Server,
    prometheus::{Prometheus, replace, shipped},
    read, root,
};
use reqwest::blocking::multipart::{Form, Part};
use serde_json::Value;

fn batch_form(photo: &[u8], n: usize) -> Form {
    (0..n).fold(Form::new(), |f, i| f.part("image", Part::bytes(photo.to_vec()).file_name(format!("{i}.jpg"))))
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 400 concurrent single-image requests from 32 threads against room for 8 images: only 200s
/// and 429s come back, none hangs, and resident memory stays bounded.
#[test]
fn a_flood_beyond_capacity_answers_only_200_and_429() {
    let s = Server::start(&["--max-queued-images", "8", "--request-timeout-ms", "20000"]);
    let photo = read("photos/rocket.jpg");
    let before = rss_kib(s.pid());
    let (ok, busy, other) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..32 {
            let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            let (photo, url, ok, busy, other) = (&photo, format!("{}/v1/score", s.url), &ok, &busy, &other);
            scope.spawn(move || {
                for _ in 0..12 {
                    let form = Form::new().part("image", Part::bytes(photo.clone()).file_name("r.jpg"));
                    match client.post(&url).multipart(form).send().map(|r| r.status().as_u16()) {
                        Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(429) => busy.fetch_add(1, Ordering::Relaxed),
                        _ => other.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    let (ok, busy, other) = (ok.into_inner(), busy.into_inner(), other.into_inner());
    assert_eq!(other, 0, "only 200 and 429 may come back ({ok} ok, {busy} busy)");
    assert_eq!(ok + busy, 384);
    assert!(ok > 0 && busy > 0, "{ok} ok, {busy} busy: the flood must both pass and overflow");
    assert!(start.elapsed() < Duration::from_secs(120), "the flood took {:?}", start.elapsed());
    let after = rss_kib(s.pid());
    assert!(after < before + 512 * 1024, "resident memory grew from {before} KiB to {after} KiB");
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_rejected_images_total{model=\"mobilenet_v2-imagenet\",reason=\"overloaded\"}"));
    assert!(metrics.contains("qscore_images_in_flight 0"), "every permit was given back");
    s.assert_ready();
}

/// A client that sends its headers and then trickles its body is cut off at the request
/// deadline with a 408 JSON error, and the server keeps serving others meanwhile.
#[test]
fn a_slow_client_is_cut_off_by_the_deadline() {
    let s = Server::start(&["--request-timeout-ms", "1500"]);
    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut sock = TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        sock,
        "POST /v1/score HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
    )
    .unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0_u8; 4096];
    // One byte every 100 ms: alive, but far too slow for the deadline.
    sock.set_nonblocking(true).unwrap();
    while start.elapsed() < Duration::from_secs(8) {
        let _ = sock.write_all(b"x");
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                    break;
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "after {elapsed:?}: {text}");
    assert!(text.contains("\"body_timeout\""), "{text}");
    assert!(elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_secs(5), "cut off after {elapsed:?}");
    assert_eq!(s.post_image("/v1/score", "rocket.jpg", read("photos/rocket.jpg")).status(), 200);
}

/// SIGTERM while batches are in flight: every request already sent is answered 200, then the
/// process exits 0.
#[test]
fn sigterm_during_load_answers_every_accepted_request() {
    let s = Server::start(&["--max-batch", "8"]);
    let photo = read("photos/china.jpg");
    let url = format!("{}/v1/score/batch", s.url);
    let sent = AtomicUsize::new(0);
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (url, photo, client, sent) = (url.clone(), photo.clone(), s.client(), &sent);
                scope.spawn(move || {
                    sent.fetch_add(1, Ordering::SeqCst);
                    client.post(url).multipart(batch_form(&photo, 16)).send().map_or(0, |r| r.status().as_u16())
                })
            })
            .collect();
        while sent.load(Ordering::SeqCst) < 8 {
            std::thread::sleep(Duration::from_millis(5));
        }
        // 8 x 16 images take a second or more on two cores: the signal lands mid-load.
        std::thread::sleep(Duration::from_millis(300));
        s.signal("TERM");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|&c| c == 200), "answers during drain: {answers:?}");
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}");
}

/// With a keys file, /v1/* needs `Authorization: Bearer KEY` (401 JSON otherwise) while health,
/// metrics and the API document stay open. Rewriting the file and sending SIGHUP rotates the
/// keys without a restart, while a client keeps scoring with a key present in both files and
/// never sees a failure.
#[test]
fn api_keys_are_required_and_rotate_on_sighup() {
    let dir = std::env::temp_dir().join(format!("qscore-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "old-key\nstable-key\n").unwrap();
    let s = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    let photo = read("photos/rocket.jpg");
    let score = |key: Option<&str>| {
        let mut req =
            s.client().post(format!("{}/v1/score", s.url)).header("content-type", "image/jpeg").body(photo.clone());
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().unwrap()
    };
    let missing = score(None);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    common::assert_error(missing, 401, "unauthorized");
    common::assert_error(score(Some("nope")), 401, "unauthorized");
    assert_eq!(score(Some("old-key")).status(), 200);
    for open in ["/health/ready", "/health/live", "/metrics", "/openapi.json"] {
        assert_eq!(s.get(open).status(), 200, "{open} must stay open");
    }
    common::assert_error(s.get("/v1/models"), 401, "unauthorized");

    let stop = AtomicBool::new(false);
    let failures = std::thread::scope(|scope| {
        let steady = scope.spawn(|| {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = score(Some("stable-key"));
                if r.status() != 200 {
                    failures.push(r.status().as_u16());
                }
            }
            failures
        });
        std::fs::write(&keys, "new-key\nstable-key\n").unwrap();
        s.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while score(Some("new-key")).status() != 200 {
            assert!(Instant::now() < deadline, "the new key never took effect");
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        steady.join().unwrap()
    });
    assert!(failures.is_empty(), "requests with a kept key failed during rotation: {failures:?}");
    common::assert_error(score(Some("old-key")), 401, "unauthorized");
    assert!(s.log().contains("API keys reloaded"), "{}", s.log());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The auth scheme is case-insensitive (RFC 9110 §11.1) with any spaces after it; a key file
/// line that no header could carry (non-ASCII, control characters) stops the start naming the
/// line, and on a reload keeps the old keys, saying why in the log.
#[test]
fn api_key_schemes_and_key_file_lines() {
    let dir = std::env::temp_dir().join(format!("qscore-keylines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "# ops\nk-1\nclé-2\n").unwrap();
    // A server that starts anyway is killed after a while, so the test fails instead of waiting.
    let mut child = common::qscore_bin()
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--api-keys-file"])
        .arg(&keys)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("line 3"), "qscore started with a key it cannot match:\n{stderr}");

    std::fs::write(&keys, "k-1\n").unwrap();
    let s = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    let models = |authorization: &str| {
        s.client().get(format!("{}/v1/models", s.url)).header("authorization", authorization).send().unwrap().status()
    };
    // "u:k-1" in base64, as basic auth sends it.
    for ok in ["bearer k-1", "BEARER k-1", "Bearer    k-1", "basic dTprLTE=", "BASIC  dTprLTE="] {
        assert_eq!(models(ok), 200, "{ok:?}");
    }
    assert_eq!(models("Bearerk-1"), 401);
    std::fs::write(&keys, "k-2\nk-\u{3}3\n").unwrap();
    s.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("API keys not reloaded") {
        assert!(Instant::now() < deadline, "no reload refusal in the log:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.log().contains("line 2"), "{}", s.log());
    assert_eq!(models("Bearer k-1"), 200, "the old keys stay");
    assert_eq!(models("Bearer k-2"), 401);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A key file rewritten slowly (truncated, then written a few bytes at a time with a stall of
/// several seconds mid-file, as a stalled writer or a copy over NFS does) never locks out a key
/// that is in both the old and the new file, while a client checks it every few milliseconds;
/// the new file's keys take effect once it is complete.
#[test]
fn a_key_file_caught_half_written_never_locks_out_a_kept_key() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("qscore-keyslow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "# old\nstable-key-0123456789\nold-key\n").unwrap();
    let s = Server::start(&["--api-keys-file", keys.to_str().unwrap()]);
    let models =
        |key: &str| s.client().get(format!("{}/v1/models", s.url)).bearer_auth(key).send().unwrap().status().as_u16();
    assert_eq!(models("stable-key-0123456789"), 200);
    let stop = AtomicBool::new(false);
    let (checks, failures) = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let (mut checks, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let status = models("stable-key-0123456789");
                checks += 1;
                if status != 200 {
                    failures.push(status);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (checks, failures)
        });
        let mut f = std::fs::File::create(&keys).unwrap(); // truncates
        for (i, piece) in b"# new\nnew-key\nstable-key-0123456789\n".chunks(6).enumerate() {
            f.write_all(piece).unwrap();
            f.flush().unwrap();
            std::thread::sleep(if i == 3 { Duration::from_millis(2500) } else { Duration::from_millis(30) });
        }
        drop(f);
        let deadline = Instant::now() + Duration::from_secs(10);
        while models("new-key") != 200 {
            assert!(Instant::now() < deadline, "the new key never took effect");
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        client.join().unwrap()
    });
    assert!(checks > 100, "{checks} checks");
    assert!(failures.is_empty(), "a kept key was refused {} times during the rewrite", failures.len());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Requests from many clients share ONNX Runtime runs: 16 concurrent single-image requests
/// produce runs of more than one image, and each answer says how big its run was.
#[test]
fn concurrent_requests_are_batched_together() {
    let s = Server::start(&["--max-batch", "16", "--max-batch-delay-ms", "20"]);
    let photo = read("photos/coffee.png");
    let sizes: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (photo, s) = (photo.clone(), &s);
                scope.spawn(move || {
                    let r: Value = s.post_image("/v1/score", "coffee.png", photo).json().unwrap();
                    r["timings_ms"]["batch_size"].as_u64().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(sizes.iter().any(|&n| n > 1), "no two concurrent requests shared a run: {sizes:?}");
    let metrics = s.get("/metrics").text().unwrap();
    let runs = metrics
        .lines()
        .find(|l| l.starts_with("qscore_batch_size_count{model=\"mobilenet_v2-imagenet\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(runs < 17.0, "16 requests (+1 warm-up) took {runs} runs: nothing was batched");
}

/// The alert thresholds shipped in deploy/prometheus/alerts.yml, as `(psi, ks)` (the alerts
/// read the fleet-wide series; one server is a fleet of one).
fn alert_thresholds() -> (f64, f64) {
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let after = |metric: &str| -> f64 {
        let at = rules.find(&format!("{metric} > ")).unwrap_or_else(|| panic!("no rule on {metric}"));
        rules[at + metric.len() + 3..].split_whitespace().next().unwrap().parse().unwrap()
    };
    (after("model:qscore_drift_psi:fleet"), after("model:qscore_drift_ks_binned:fleet"))
}

/// The committed Fashion-MNIST fixtures (t10k images, like the calibration's held-out data),
/// and the same images degraded: blurred and noised.
fn fmnist_streams() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut clean = Vec::new();
    let mut degraded = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root().join("tests/fixtures/fmnist"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().map(|f| f.unwrap().path()))
        .collect();
    files.sort();
    let mut seed = 12345_u32;
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        degraded.push(common::degrade(&bytes, &mut seed));
        clean.push(bytes);
    }
    (clean, degraded)
}

fn drift_of(s: &Server, model: &str) -> Value {
    let d: Value = s.get(&format!("/v1/drift?model={model}")).json().unwrap();
    d["models"][0].clone()
}

fn gauge(metrics: &str, name: &str, model: &str) -> f64 {
    let prefix = format!("{name}{{model=\"{model}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// Feed the calibration-like images, then a degraded stream: the drift statistics stay under
/// the shipped alert thresholds first and rise past them after, in /v1/drift and in the
/// gauges alike. An uncalibrated model says it has no reference.
#[test]
fn drift_rises_past_the_alert_thresholds_on_a_degraded_stream() {
    let model = "fmnist-simclr";
    let s = Server::start(&["--drift-window", "200"]);
    let (psi_alert, ks_alert) = alert_thresholds();
    let (clean, degraded) = fmnist_streams();
    let post = |images: &[Vec<u8>]| {
        let form = images
            .iter()
            .enumerate()
            .fold(Form::new(), |f, (i, b)| f.part("image", Part::bytes(b.clone()).file_name(format!("{i}.png"))));
        let r = s.client().post(format!("{}/v1/score/batch?model={model}", s.url)).multipart(form).send().unwrap();
        assert_eq!(r.status(), 200);
    };

    let empty = drift_of(&s, model);
    assert_eq!(empty["status"], "empty_window");
    post(&clean);
    let before = drift_of(&s, model);
    assert_eq!(before["status"], "ok");
    assert_eq!(before["window_images"], 200);
    let (ks0, psi0) = (before["ks"].as_f64().unwrap(), before["psi"].as_f64().unwrap());
    assert!(ks0 < ks_alert && psi0 < psi_alert, "clean stream: KS {ks0}, PSI {psi0}");

    post(&degraded);
    let after = drift_of(&s, model);
    let (ks1, psi1) = (after["ks"].as_f64().unwrap(), after["psi"].as_f64().unwrap());
    assert_eq!(after["window_images"], 200, "the window keeps the latest 200");
    assert!(ks1 > ks_alert && psi1 > psi_alert, "degraded stream: KS {ks1}, PSI {psi1}");
    let expected_error = |d: &Value| d["mean_p_misclassified"].as_f64().unwrap();
    let reference_error = after["reference_mean_p_misclassified"].as_f64().unwrap();
    eprintln!(
        "mean p_misclassified: reference {reference_error:.3}, clean {:.3}, degraded {:.3}",
        expected_error(&before),
        expected_error(&after)
    );
    assert!(
        (expected_error(&before) - reference_error).abs() < 0.05,
        "the held-out stream's expected error rate {} should be near the reference's {reference_error}",
        expected_error(&before)
    );
    assert!(
        expected_error(&after) > 1.5 * reference_error && expected_error(&after) > reference_error + 0.05,
        "the degraded stream's expected error rate {} should pass the alert (reference {reference_error})",
        expected_error(&after)
    );
    assert!(!after["features"].as_array().unwrap().is_empty(), "the shifted features are listed");

    let metrics = s.get("/metrics").text().unwrap();
    assert!((gauge(&metrics, "qscore_drift_ks", model) - ks1).abs() < 1e-9, "{metrics}");
    assert!((gauge(&metrics, "qscore_drift_psi", model) - psi1).abs() < 1e-9);
    assert_eq!(gauge(&metrics, "qscore_drift_window_images", model), 200.0);

    let none = drift_of(&s, "mobilenet_v2-imagenet");
    assert_eq!(none["status"], "no_reference");
    assert!(none["message"].as_str().unwrap().contains("qscore calibrate"));
    assert_eq!(none["embedding"]["status"], "no_sample", "{none}");
    assert!(none["embedding"]["p_value"].is_null());
}

/// The shipped deploy/prometheus/prometheus.yml and alerts.yml in a real Prometheus, scraping
/// one qscore. Only timing changes: scrapes and rule evaluations every second, and every alert's
/// `for:` set to 0s, so a test sees in seconds what production sees in minutes. The alert
/// expressions are the shipped ones, byte for byte.
struct Alerting(Prometheus);

impl Alerting {
    fn start(target: &str) -> Self {
        let config = replace(&shipped("prometheus.yml"), "localhost:8080", target);
        let config = replace(&config, "scrape_interval: 15s", "scrape_interval: 1s\n  evaluation_interval: 1s");
        let mut alerts = shipped("alerts.yml");
        for held in ["for: 10m", "for: 15m", "for: 5m"] {
            alerts = alerts.replace(held, "for: 0s");
        }
        assert!(!alerts.contains("for: 1") && !alerts.contains("for: 5"), "an alert keeps a hold time:\n{alerts}");
        Self(Prometheus::start("alerting", &config, &alerts))
    }

    fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        self.0.api(path, query)
    }

    /// Waits until Prometheus has scraped `window` drift images for `model` and evaluated the
    /// rules on that scrape at least twice since.
    fn wait_for_window(&self, model: &str, window: usize) {
        let start = Instant::now();
        loop {
            let q = self.api("query", &[("query", &format!("qscore_drift_window_images{{model=\"{model}\"}}"))]);
            if q["result"][0]["value"][1].as_str() == Some(&window.to_string()) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "Prometheus never scraped the window: {q}");
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(Duration::from_millis(2500));
    }

    /// The names of the alerts firing now.
    fn firing(&self) -> Vec<String> {
        let alerts = self.api("alerts", &[]);
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| a["labels"]["alertname"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// The shipped alerting rules in a real Prometheus server scraping a real qscore: an undrifted
/// stream (the held-out Fashion-MNIST fixtures) fires no alert of the drift group; the same
/// images blurred and noised fire the PSI, KS and expected-error-rate alerts, read from
/// Prometheus's own alerts API.
#[test]
fn prometheus_fires_the_shipped_drift_alerts_on_a_degraded_stream_only() {
    let model = "fmnist-simclr";
    let s = Server::start(&["--drift-window", "200"]);
    let prometheus = Alerting::start(s.url.trim_start_matches("http://"));
    let (clean, degraded) = fmnist_streams();
    let post = |images: &[Vec<u8>]| {
        let form = images
            .iter()
            .enumerate()
            .fold(Form::new(), |f, (i, b)| f.part("image", Part::bytes(b.clone()).file_name(format!("{i}.png"))));
        let r = s.client().post(format!("{}/v1/score/batch?model={model}", s.url)).multipart(form).send().unwrap();
        assert_eq!(r.status(), 200);
    };

    post(&clean);
    prometheus.wait_for_window(model, 200);
    let rules = prometheus.api("rules", &[]);
    let drift_rules = rules["groups"].as_array().unwrap().iter().find(|g| g["name"] == "qscore-drift").unwrap();
    for rule in drift_rules["rules"].as_array().unwrap() {
        assert_eq!(rule["health"], "ok", "a shipped rule does not evaluate: {rule}");
    }
    let drift_alerts: Vec<&str> =
        drift_rules["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    let firing = prometheus.firing();
    assert!(
        !firing.iter().any(|a| drift_alerts.contains(&a.as_str())),
        "drift alerts on the undrifted stream: {firing:?}"
    );

    post(&degraded);
    let start = Instant::now();
    loop {
        let firing = prometheus.firing();
        if ["QScoreDriftPSI", "QScoreDriftKS", "QScoreExpectedErrorRateHigh"]
            .iter()
            .all(|want| firing.iter().any(|a| a == want))
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the drift alerts did not fire: {firing:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
