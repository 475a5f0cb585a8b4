//! Models change without a restart (issue 16 §1), on a real server over a copy of the bundled
//! models: a folder replaced in place under load is picked up by polling with no failed
//! request, no batch answered by two versions and readiness never lost; a folder that fails to
//! load leaves the old version serving and says so; SIGHUP adds and removes folders at once.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine as _;
use common::{Server, assert_error, root};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A models folder of its own, removed on drop.
struct ModelsDir(PathBuf);

impl ModelsDir {
    fn new(tag: &str, models: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("qscore-reload-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for m in models {
            copy_model(m, &dir.join(m), m, None);
        }
        Self(dir)
    }
}

impl Drop for ModelsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the bundled model `from` into `to` (file by file, as a careless operator would),
/// named `name`, with `version` in its model.toml when given.
fn copy_model(from: &str, to: &Path, name: &str, version: Option<&str>) {
    std::fs::create_dir_all(to).unwrap();
    let src = root().join("models").join(from);
    std::fs::copy(src.join("model.onnx"), to.join("model.onnx")).unwrap();
    // A calibration names the model it was made for; a copy under another name is recalibrated
    // in real life, relabelled here.
    let calibration = std::fs::read_to_string(src.join("calibration.json")).unwrap();
    let relabelled = calibration.replacen(&format!("\"model\": \"{from}\""), &format!("\"model\": \"{name}\""), 1);
    std::fs::write(to.join("calibration.json"), relabelled).unwrap();
    let mut toml = std::fs::read_to_string(src.join("model.toml")).unwrap();
    toml = toml.replace(&format!("name = \"{from}\""), &format!("name = \"{name}\""));
    if let Some(v) = version {
        toml = toml.replace("version = \"1.0.0\"", &format!("version = \"{v}\""));
    }
    std::fs::write(to.join("model.toml"), toml).unwrap();
}

fn sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

fn models(s: &Server) -> Value {
    s.get("/v1/models").json().unwrap()
}

fn model<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["models"].as_array().unwrap().iter().find(|m| m["name"] == name)
}

/// Waits until `check` holds on `GET /v1/models`, at most `limit`; answers how long it took.
fn wait_for(s: &Server, limit: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let list = models(s);
        if check(&list) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what} not seen within {limit:?}: {list}\nlog:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fixture_b64(rel: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(common::read(rel))
}

/// The JSON batch answer for `copies` copies of one fixture.
fn score_batch(client: &reqwest::blocking::Client, url: &str, model: &str, image: &str, copies: usize) -> (u16, Value) {
    let images: Vec<Value> = (0..copies).map(|i| serde_json::json!({"id": i.to_string(), "data": image})).collect();
    let r = client
        .post(format!("{url}/v1/score/batch?model={model}"))
        .json(&serde_json::json!({ "images": images }))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn a_model_replaced_under_load_fails_no_request() {
    let dir = ModelsDir::new("load", &["fmnist-simclr", "fmnist-vicreg"]);
    let s = Server::start_with_models(&dir.0, &["--model", "fmnist-simclr", "--reload-poll-ms", "200"]);
    s.assert_ready();
    let before = models(&s);
    let old_sha = sha256(&dir.0.join("fmnist-simclr/calibration.json"));
    assert_eq!(model(&before, "fmnist-simclr").unwrap()["calibration"]["sha256"], old_sha.as_str());
    let image = fixture_b64("fmnist/shirt/t10k-00004.png");
    let (_, want_old) = score_batch(&s.client(), &s.url, "fmnist-simclr", &image, 1);
    let (_, want_new) = score_batch(&s.client(), &s.url, "fmnist-vicreg", &image, 1);
    let (q_old, q_new) = (want_old["results"][0]["q_score"].clone(), want_new["results"][0]["q_score"].clone());
    assert_ne!(q_old, q_new, "the two encoders must answer differently for the swap to be visible");

    // Four clients send batches of one image; a reader watches readiness.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, mixed, new_seen) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (stop, sent, failed, mixed, new_seen) =
            (stop.clone(), sent.clone(), failed.clone(), mixed.clone(), new_seen.clone());
        let (url, image, q_old, q_new) = (s.url.clone(), image.clone(), q_old.clone(), q_new.clone());
        threads.push(std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = score_batch(&client, &url, "fmnist-simclr", &image, 8);
                sent.fetch_add(1, Ordering::Relaxed);
                if status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed during the swap: {status} {body}");
                    continue;
                }
                let qs: Vec<&Value> = body["results"].as_array().unwrap().iter().map(|r| &r["q_score"]).collect();
                if qs.iter().all(|q| **q == q_new) {
                    new_seen.fetch_add(1, Ordering::Relaxed);
                } else if !qs.iter().all(|q| **q == q_old) {
                    mixed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let not_ready = Arc::new(AtomicUsize::new(0));
    {
        let (stop, not_ready, url) = (stop.clone(), not_ready.clone(), s.url.clone());
        threads.push(std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            while !stop.load(Ordering::Relaxed) {
                if client.get(format!("{url}/health/ready")).send().map_or(true, |r| r.status() != 200) {
                    not_ready.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));

    // Replace fmnist-simclr in place with VICReg's weights and calibration, version 2.0.0.
    let dest = dir.0.join("fmnist-simclr");
    copy_model("fmnist-vicreg", &dest, "fmnist-simclr", Some("2.0.0"));
    let new_sha = sha256(&dest.join("calibration.json"));
    let took = wait_for(&s, Duration::from_secs(10), "version 2.0.0", |l| {
        model(l, "fmnist-simclr")
            .is_some_and(|m| m["version"] == "2.0.0" && m["calibration"]["sha256"] == new_sha.as_str())
    });
    let swapped = Instant::now();
    while new_seen.load(Ordering::Relaxed) < 5 && swapped.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());

    let (sent, failed, mixed) =
        (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), mixed.load(Ordering::Relaxed));
    eprintln!("swap seen after {took:?}; {sent} batches of 8 sent, {failed} failed, {mixed} mixed");
    assert!(sent >= 20, "too little load to mean anything: {sent} batches");
    assert_eq!(failed, 0, "requests failed during the swap; log:\n{}", s.log());
    assert_eq!(mixed, 0, "a batch was answered by two versions");
    assert_eq!(not_ready.load(Ordering::Relaxed), 0, "/health/ready left 200 during the swap");
    assert!(new_seen.load(Ordering::Relaxed) >= 5, "the new version never answered");

    // The new version answers exactly what VICReg answers, and the metric names it.
    let (_, now) = score_batch(&s.client(), &s.url, "fmnist-simclr", &image, 1);
    assert_eq!(now["results"][0]["p_misclassified"], want_new["results"][0]["p_misclassified"]);
    let metrics = s.get("/metrics").text().unwrap();
    let info = |v: &str, sha: &str| {
        format!(
            "qscore_model_info{{calibration_sha256=\"{sha}\",device=\"cpu\",model=\"fmnist-simclr\",version=\"{v}\"}} 1"
        )
    };
    assert!(metrics.contains(&info("2.0.0", &new_sha)), "{metrics}");
    assert!(!metrics.contains(&info("1.0.0", &old_sha)), "the old version's info series must go");
    assert!(metrics.contains("qscore_model_reloads_total{model=\"fmnist-simclr\",outcome=\"loaded\"} 1"), "{metrics}");
    let log = s.log();
    assert!(log.lines().any(|l| l.contains("model ready") && l.contains("2.0.0") && l.contains("replaced")), "{log}");
}

#[test]
fn a_broken_folder_keeps_the_old_version_and_sighup_adds_and_removes_at_once() {
    let dir = ModelsDir::new("hup", &["fmnist-simclr", "fmnist-vicreg"]);
    // Polling off: only SIGHUP reloads, so every change below is its doing.
    let s = Server::start_with_models(&dir.0, &["--model", "fmnist-simclr", "--reload-poll-ms", "0"]);
    s.assert_ready();
    let image = fixture_b64("fmnist/bag/t10k-00030.png");
    let (_, first) = score_batch(&s.client(), &s.url, "fmnist-simclr", &image, 1);
    let q_first = first["results"][0]["q_score"].clone();
    assert!(q_first.is_number(), "{first}");

    // A half-copied model: model.onnx cut short, version bumped. The old version keeps serving.
    let onnx = dir.0.join("fmnist-simclr/model.onnx");
    let toml = dir.0.join("fmnist-simclr/model.toml");
    let (whole, toml_1_0) = (std::fs::read(&onnx).unwrap(), std::fs::read_to_string(&toml).unwrap());
    let mtimes = [&onnx, &toml].map(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    let toml_1_1 = toml_1_0.replace("version = \"1.0.0\"", "version = \"1.1.0\"");
    std::fs::write(&onnx, &whole[..whole.len() / 3]).unwrap();
    std::fs::write(&toml, &toml_1_1).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(models(&s)["load_failures"].as_array().unwrap().is_empty(), "no reload without SIGHUP when polling is off");
    s.signal("HUP");
    let took = wait_for(&s, Duration::from_secs(5), "the load failure", |l| {
        l["load_failures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["model"] == "fmnist-simclr" && f["serving_version"] == "1.0.0")
    });
    eprintln!("SIGHUP failure reported after {took:?}");
    let list = models(&s);
    assert_eq!(model(&list, "fmnist-simclr").unwrap()["version"], "1.0.0");
    let failure = &list["load_failures"][0];
    assert!(failure["error"].as_str().unwrap().contains("model.onnx"), "the error names the file: {failure}");
    let (status, again) = score_batch(&s.client(), &s.url, "fmnist-simclr", &image, 1);
    assert_eq!((status, &again["results"][0]["q_score"]), (200, &q_first), "the old version serves on");
    assert_eq!(s.get("/health/ready").status(), 200);
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_model_load_failing{model=\"fmnist-simclr\"} 1"), "{metrics}");
    assert!(metrics.contains("qscore_model_reloads_total{model=\"fmnist-simclr\",outcome=\"failed\"} 1"), "{metrics}");
    assert!(s.log().contains("cannot load") && s.log().contains("keeps serving"), "{}", s.log());

    // Another SIGHUP with nothing changed does not retry the same broken files.
    s.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_model_reloads_total{model=\"fmnist-simclr\",outcome=\"failed\"} 1"), "{metrics}");

    // Put back exactly as loaded (bytes and times, as `cp -p` would): the failure is over, with
    // nothing to load.
    for (path, bytes, mtime) in [(&onnx, whole.as_slice(), mtimes[0]), (&toml, toml_1_0.as_bytes(), mtimes[1])] {
        std::fs::write(path, bytes).unwrap();
        std::fs::File::options().write(true).open(path).unwrap().set_modified(mtime).unwrap();
    }
    s.signal("HUP");
    wait_for(&s, Duration::from_secs(5), "the failure cleared", |l| l["load_failures"].as_array().unwrap().is_empty());
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_model_load_failing{model=\"fmnist-simclr\"} 0"), "{metrics}");
    assert!(!metrics.contains("outcome=\"loaded\""), "nothing was loaded again: {metrics}");
    std::fs::write(&onnx, &whole[..whole.len() / 3]).unwrap();
    s.signal("HUP");
    wait_for(&s, Duration::from_secs(5), "the failure again", |l| !l["load_failures"].as_array().unwrap().is_empty());

    // A new folder and a removed one, in one SIGHUP.
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_drift_window_score_bin_images{bin=\"0\",model=\"fmnist-vicreg\"}"), "{metrics}");
    copy_model("fmnist-byol", &dir.0.join("fmnist-new"), "fmnist-new", None);
    std::fs::remove_dir_all(dir.0.join("fmnist-vicreg")).unwrap();
    s.signal("HUP");
    wait_for(&s, Duration::from_secs(5), "fmnist-new in, fmnist-vicreg out", |l| {
        model(l, "fmnist-new").is_some() && model(l, "fmnist-vicreg").is_none()
    });
    // A removed model's gauges go (a fleet sum must not count it); counters keep their totals.
    let metrics = s.get("/metrics").text().unwrap();
    let stale: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("model=\"fmnist-vicreg\"") && !l.starts_with('#'))
        .filter(|l| {
            let family = l.split('{').next().unwrap();
            !["_total", "_bucket", "_sum", "_count"].iter().any(|s| family.ends_with(s))
        })
        .collect();
    assert!(stale.is_empty(), "gauges of a removed model: {stale:?}");
    let (status, body) = score_batch(&s.client(), &s.url, "fmnist-new", &image, 1);
    assert!(status == 200 && body["results"][0]["q_score"].is_number(), "{status} {body}");
    assert_error(s.get("/v1/drift?model=fmnist-vicreg"), 404, "unknown_model");
    let drift: Value = s.get("/v1/drift?model=fmnist-new").json().unwrap();
    assert_eq!(drift["models"][0]["window_images"], 1, "the new model has its own drift window: {drift}");

    // Fixed: the folder loads, the failure and the gauge clear.
    std::fs::write(&onnx, &whole).unwrap();
    std::fs::write(&toml, &toml_1_1).unwrap();
    s.signal("HUP");
    wait_for(&s, Duration::from_secs(5), "version 1.1.0", |l| {
        model(l, "fmnist-simclr").is_some_and(|m| m["version"] == "1.1.0")
            && l["load_failures"].as_array().unwrap().is_empty()
    });
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_model_load_failing{model=\"fmnist-simclr\"} 0"), "{metrics}");
    let (_, fixed) = score_batch(&s.client(), &s.url, "fmnist-simclr", &image, 1);
    assert_eq!(fixed["results"][0]["q_score"], q_first, "the same weights answer the same");
}

/// Waits until `/metrics` holds `line`, at most `limit`.
fn wait_metric(s: &Server, limit: Duration, line: &str) {
    let start = Instant::now();
    loop {
        let metrics = s.get("/metrics").text().unwrap();
        if metrics.contains(line) {
            return;
        }
        assert!(start.elapsed() < limit, "`{line}` not seen within {limit:?}:\n{metrics}\nlog:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Contents, not file times, decide what reloads; a calibration made for another model is
/// refused; a folder broken at start-up is reported like one broken later; and the default
/// model never moves: its folder gone, it keeps answering requests that name no model.
#[test]
fn contents_decide_what_reloads_and_the_default_never_moves() {
    let dir = ModelsDir::new("content", &["fmnist-simclr", "fmnist-vicreg"]);
    std::fs::create_dir_all(dir.0.join("broken")).unwrap();
    std::fs::write(dir.0.join("broken/model.toml"), "name = \"broken\"\n").unwrap();
    let s = Server::start_with_models(&dir.0, &["--model", "fmnist-simclr", "--reload-poll-ms", "200"]);
    s.assert_ready();
    let list = models(&s);
    let broken = &list["load_failures"][0];
    assert!(broken["model"] == "broken" && broken["serving_version"].is_null(), "{list}");
    assert!(model(&list, "fmnist-simclr").is_some() && model(&list, "fmnist-vicreg").is_some());
    wait_metric(&s, Duration::from_secs(1), "qscore_model_load_failing{model=\"broken\"} 1");

    let simclr = dir.0.join("fmnist-simclr");
    let (onnx, calibration) = (simclr.join("model.onnx"), simclr.join("calibration.json"));
    let image = common::read("fmnist/bag/t10k-00030.png");
    let q = |s: &Server| -> f64 {
        let r: Value = s.post_raw("/v1/score", "image/png", image.clone()).json().unwrap();
        assert_eq!(r["model"], "fmnist-simclr", "the default answers: {r}");
        r["q_score"].as_f64().unwrap()
    };
    let q_simclr = q(&s);

    // `touch`: new times, same bytes; nothing is loaded again.
    let set_time = |p: &Path, t: std::time::SystemTime| {
        std::fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
    };
    set_time(&onnx, std::time::SystemTime::now());
    std::thread::sleep(Duration::from_millis(1000));
    let metrics = s.get("/metrics").text().unwrap();
    assert!(!metrics.contains("outcome=\"loaded\""), "a touch reloaded: {metrics}");

    // Other weights of the same size written in place with the old time (as `rsync -a` or `tar`
    // would leave them): SIGHUP compares contents and loads them.
    let vicreg = std::fs::read(root().join("models/fmnist-vicreg/model.onnx")).unwrap();
    let (before, kept_time) = (std::fs::read(&onnx).unwrap(), std::fs::metadata(&onnx).unwrap().modified().unwrap());
    assert_eq!(before.len(), vicreg.len(), "the test needs two encoders of one size");
    std::fs::write(&onnx, &vicreg).unwrap();
    set_time(&onnx, kept_time);
    s.signal("HUP");
    wait_metric(&s, Duration::from_secs(5), "qscore_model_reloads_total{model=\"fmnist-simclr\",outcome=\"loaded\"} 1");
    assert_ne!(q(&s), q_simclr, "the new weights answer");

    // A calibration made for another model: refused, the version before serves on.
    let own = std::fs::read(&calibration).unwrap();
    std::fs::copy(root().join("models/fmnist-vicreg/calibration.json"), &calibration).unwrap();
    let took = wait_for(&s, Duration::from_secs(5), "the foreign calibration refused", |l| {
        l["load_failures"].as_array().unwrap().iter().any(|f| {
            f["model"] == "fmnist-simclr" && f["error"].as_str().unwrap().contains("made for model `fmnist-vicreg`")
        })
    });
    eprintln!("foreign calibration refused after {took:?}");
    std::fs::write(&calibration, &own).unwrap();
    wait_for(&s, Duration::from_secs(5), "the own calibration back", |l| {
        !l["load_failures"].as_array().unwrap().iter().any(|f| f["model"] == "fmnist-simclr")
    });

    // The default's folder gone: it keeps answering requests that name no model, and says so.
    let q_now = q(&s);
    let away = dir.0.join(".away");
    std::fs::rename(&simclr, &away).unwrap();
    wait_for(&s, Duration::from_secs(5), "the default's folder reported gone", |l| {
        l["load_failures"].as_array().unwrap().iter().any(|f| {
            f["model"] == "fmnist-simclr"
                && f["error"].as_str().unwrap().contains("as the default model it keeps serving")
        })
    });
    assert_eq!(models(&s)["default"], "fmnist-simclr");
    assert_eq!(q(&s), q_now);
    wait_metric(&s, Duration::from_secs(1), "qscore_model_load_failing{model=\"fmnist-simclr\"} 1");
    std::fs::rename(&away, &simclr).unwrap();
    wait_for(&s, Duration::from_secs(5), "the default's folder back", |l| {
        !l["load_failures"].as_array().unwrap().iter().any(|f| f["model"] == "fmnist-simclr")
    });
    let metrics = s.get("/metrics").text().unwrap();
    assert!(
        metrics.contains("qscore_model_reloads_total{model=\"fmnist-simclr\",outcome=\"loaded\"} 1"),
        "put back, not reloaded: {metrics}"
    );
}
