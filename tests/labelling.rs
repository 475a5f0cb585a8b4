//! Feeding labelling queues. The Label Studio ML backend against a local stand-in of Label
//! Studio's file host: a `/predict` request in Label Studio's format
//! (tests/fixtures/labelstudio/predict.json) is answered with scores that put the riskiest image
//! first when sorted ascending, as the Data Manager sorts; URLs on any other host are refused per
//! task, and never fetched. Offline, `qscore score --sort risk`; online, `--flagged-webhook`.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
};

use common::{Server, fixture};
use serde_json::Value;

/// Serves `/data/upload/7/<class>-<file>` from the fmnist fixtures, to requests carrying
/// `Authorization: Token ls-secret`; records every path asked for.
fn file_host() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut authorized = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                authorized |= line.to_ascii_lowercase().starts_with("authorization: token ls-secret");
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
            log.lock().unwrap().push(path.clone());
            let file = path.strip_prefix("/data/upload/7/").and_then(|f| f.split_once('-'));
            let body = match (authorized, file) {
                (true, Some((class, name))) => std::fs::read(fixture(&format!("fmnist/{class}/{name}"))).ok(),
                _ => None,
            };
            let _ = match body {
                Some(b) => write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    b.len()
                )
                .and_then(|()| stream.write_all(&b)),
                None => write!(stream, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            };
        }
    });
    (base, seen)
}

#[test]
fn predict_sorts_the_riskiest_first_and_fetches_only_from_label_studio() {
    let (base, seen) = file_host();
    let s =
        Server::start(&["--model", "fmnist-simclr", "--label-studio-url", &base, "--label-studio-token", "ls-secret"]);
    let health: Value = s.get("/health").json().unwrap();
    assert_eq!(health["status"], "UP");
    let setup: Value = s
        .client()
        .post(format!("{}/setup", s.url))
        .json(&serde_json::json!({"project": "7"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(setup["model_version"], "fmnist-simclr@1.0.0");

    let request = std::fs::read_to_string(fixture("labelstudio/predict.json")).unwrap();
    let r = s
        .client()
        .post(format!("{}/predict", s.url))
        .header("content-type", "application/json")
        .body(request)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r: Value = r.json().unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "one prediction per task, in order");
    let score = |i: usize| results[i]["score"].as_f64().unwrap_or_else(|| panic!("task {i}: {}", results[i]));
    let (trouser, shirt, bag) = (score(0), score(1), score(2));
    // The shirt the probe takes for a coat is the riskiest: lowest score, first in ascending order.
    assert!(shirt < trouser && shirt < bag, "shirt {shirt}, trouser {trouser}, bag {bag}");
    let v1: Value = s
        .post_raw("/v1/score", "image/png", std::fs::read(fixture("fmnist/shirt/t10k-00026.png")).unwrap())
        .json()
        .unwrap();
    assert!((shirt - (1.0 - v1["p_misclassified"].as_f64().unwrap())).abs() < 1e-6, "score = 1 - p_misclassified");
    for i in [3, 4] {
        assert!(results[i]["score"].is_null());
        assert_eq!(results[i]["error"]["code"], "url_refused", "{}", results[i]);
        assert!(results[i]["error"]["message"].as_str().unwrap().contains("refused"), "{}", results[i]);
    }
    let fetched = seen.lock().unwrap().clone();
    assert_eq!(fetched.len(), 3, "only the three Label Studio images were fetched: {fetched:?}");

    // Without the token, Label Studio's host refuses, and the task says so.
    let s2 = Server::start(&["--model", "fmnist-simclr", "--label-studio-url", &base]);
    let one = serde_json::json!({"tasks": [{"id": 1, "data": {"image": "/data/upload/7/bag-t10k-00030.png"}}]});
    let r: Value = s2.client().post(format!("{}/predict", s2.url)).json(&one).send().unwrap().json().unwrap();
    assert_eq!(r["results"][0]["error"]["code"], "fetch_failed", "{r}");
    assert!(r["results"][0]["error"]["message"].as_str().unwrap().contains("401"), "{r}");
}

/// Offline: `qscore score --sort risk` walks a folder and writes the riskiest images first, as
/// CSV or JSON lines, ready to import into any queue; a file that cannot be scored comes last
/// with its error, and the exit status says something failed.
#[test]
fn score_sorts_a_folder_riskiest_first_for_queues() {
    let run = |format: &str| {
        common::qscore_bin()
            .args(["score", "--model", "fmnist-simclr", "--sort", "risk", "--format", format])
            .arg(fixture("fmnist"))
            .arg(fixture("bad/truncated.jpg"))
            .output()
            .unwrap()
    };
    let out = run("csv");
    assert_eq!(out.status.code(), Some(1), "the truncated file fails: {}", String::from_utf8_lossy(&out.stderr));
    let mut reader = csv::Reader::from_reader(out.stdout.as_slice());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(header[..3], ["file", "risk", "q_score"]);
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 201);
    let risks: Vec<f64> = rows[..200].iter().map(|r| r[1].parse().unwrap()).collect();
    assert!(risks.windows(2).all(|w| w[0] >= w[1]), "not riskiest first");
    assert_eq!(&rows[0][4], "true", "the riskiest image is flagged");
    assert!(rows[200][0].ends_with("truncated.jpg") && rows[200][7].starts_with("undecodable_image"));

    let out = run("jsonl");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 201);
    assert!((lines[0]["risk"].as_f64().unwrap() - risks[0]).abs() < 1e-9);
    let p = lines[0]["p_misclassified"].as_f64().unwrap();
    assert!((lines[0]["risk"].as_f64().unwrap() - p).abs() < 1e-6, "risk = p_misclassified for a calibrated model");
}

/// A loopback endpoint that records each POST body and answers `status` after `delay`.
fn receiver(status: u16, delay: std::time::Duration) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/flagged", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&bodies);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = std::io::Read::read_exact(&mut reader, &mut body);
                log.lock().unwrap().push(String::from_utf8_lossy(&body).to_string());
                std::thread::sleep(delay);
                let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            });
        }
    });
    (url, bodies)
}

fn fmnist_batch(s: &Server) -> Value {
    let mut form = reqwest::blocking::multipart::Form::new();
    for class in ["shirt", "coat", "pullover", "trouser"] {
        let mut files: Vec<_> =
            std::fs::read_dir(fixture(&format!("fmnist/{class}"))).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let name = format!("{class}/{}", f.file_name().unwrap().to_str().unwrap());
            form = form
                .part("image", reqwest::blocking::multipart::Part::bytes(std::fs::read(&f).unwrap()).file_name(name));
        }
    }
    s.client()
        .post(format!("{}/v1/score/batch?model=fmnist-simclr", s.url))
        .multipart(form)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// `--flagged-webhook`: every flagged answer is POSTed with its id and scores, never the image.
#[test]
fn flagged_answers_are_pushed_to_the_webhook() {
    let (url, bodies) = receiver(200, std::time::Duration::ZERO);
    let s = Server::start(&["--flagged-webhook", &url]);
    let b = fmnist_batch(&s);
    let flagged: Vec<&str> = b["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["likely_misclassified"] == true)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(!flagged.is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while bodies.lock().unwrap().len() < flagged.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} events arrived",
            bodies.lock().unwrap().len(),
            flagged.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let events: Vec<Value> = bodies.lock().unwrap().iter().map(|b| serde_json::from_str(b).unwrap()).collect();
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want = flagged.clone();
    want.sort_unstable();
    assert_eq!(ids, want, "exactly the flagged images, by id");
    for e in &events {
        assert_eq!(e["model"], "fmnist-simclr");
        assert!(e["p_misclassified"].as_f64().is_some() && e["risk_source"] == "max_softmax");
        assert!(e.as_object().unwrap().len() <= 8 && e.to_string().len() < 400, "never the image: {e}");
    }
}

/// A slow, failing endpoint never slows scoring: each event gets at most 3 tries, then counts
/// as failed.
#[test]
fn a_failing_webhook_never_slows_scoring() {
    let (url, bodies) = receiver(500, std::time::Duration::from_secs(2));
    let s = Server::start(&["--flagged-webhook", &url, "--flagged-webhook-timeout-ms", "500"]);
    let start = std::time::Instant::now();
    let b = fmnist_batch(&s);
    assert!(b["summary"]["flagged"].as_u64().unwrap() > 0);
    for _ in 0..5 {
        let _ = fmnist_batch(&s);
    }
    assert!(
        start.elapsed() < std::time::Duration::from_secs(15),
        "scoring waited for the webhook: {:?}",
        start.elapsed()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let metrics = s.get("/metrics").text().unwrap();
        if metrics.contains("qscore_webhook_events_total{outcome=\"failed\"}") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no event was given up on:\n{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let first_id = serde_json::from_str::<Value>(&bodies.lock().unwrap()[0]).unwrap()["id"].clone();
    let tries =
        bodies.lock().unwrap().iter().filter(|b| serde_json::from_str::<Value>(b).unwrap()["id"] == first_id).count();
    assert_eq!(tries, 3, "bounded retries");
}
