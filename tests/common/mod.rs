//! A real `qscore serve` process on an ephemeral loopback port, for the integration tests.

#![allow(dead_code)]

pub mod prometheus;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The crate root, where `models/`, `.ort/` and `tests/fixtures/` live.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

pub fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// The photos every test scores: real JPEG and PNG photographs from scikit-image/scikit-learn.
pub const PHOTOS: [&str; 6] = ["astronaut.png", "chelsea.png", "china.jpg", "coffee.png", "flower.jpg", "rocket.jpg"];

pub fn qscore_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qscore"));
    // The bundled models folder holds several models; the tests' default is the ImageNet one,
    // as it is for `make run`.
    cmd.current_dir(root()).env("QSCORE_LOG", "info,ort=warn").env("QSCORE_MODEL", "mobilenet_v2-imagenet");
    cmd
}

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `qscore serve` with the bundled models and `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_models(&root().join("models"), extra)
    }

    pub fn start_with_models(models: &Path, extra: &[&str]) -> Self {
        let mut child = qscore_bin()
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--models-dir"])
            .arg(models)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qscore serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on http://") {
                    let _ = tx.send(line[i + "listening on ".len()..].trim().to_owned());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => Self { child, url, log },
            Err(_) => {
                let _ = child.kill();
                panic!("qscore did not start:\n{}", log.lock().unwrap());
            }
        }
    }

    pub fn client(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.client().get(format!("{}{path}", self.url)).send().unwrap()
    }

    /// POSTs one image as multipart field `image`.
    pub fn post_image(&self, path: &str, name: &str, bytes: Vec<u8>) -> reqwest::blocking::Response {
        let part = reqwest::blocking::multipart::Part::bytes(bytes).file_name(name.to_owned());
        let form = reqwest::blocking::multipart::Form::new().part("image", part);
        self.client().post(format!("{}{path}", self.url)).multipart(form).send().unwrap()
    }

    /// POSTs a raw body with a content type.
    pub fn post_raw(&self, path: &str, content_type: &str, bytes: Vec<u8>) -> reqwest::blocking::Response {
        self.client()
            .post(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .unwrap()
    }

    pub fn assert_ready(&self) {
        let r = self.get("/health/ready");
        assert_eq!(r.status(), 200, "server not ready; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "qscore did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "qscore did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts a JSON error answer: status, code, and a message.
pub fn assert_error(r: reqwest::blocking::Response, status: u16, code: &str) -> serde_json::Value {
    let got = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = r.text().unwrap();
    assert_eq!(got, status, "expected {status} {code}, got {got}: {text}");
    assert!(ct.starts_with("application/json"), "error content type {ct}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], code, "{text}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.len() > 10), "{text}");
    v
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().unwrap()).collect()
}

/// `bytes` (an image) blurred and overlaid with deterministic noise from `seed` (advanced), as
/// a PNG: the degraded images the drift tests feed a server to make it drift.
pub fn degrade(bytes: &[u8], seed: &mut u32) -> Vec<u8> {
    let img = image::load_from_memory(bytes).unwrap().to_luma8();
    let mut blurred = image::imageops::blur(&img, 2.0);
    for p in blurred.pixels_mut() {
        *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (*seed >> 24) as i32 - 128;
        p.0[0] = (i32::from(p.0[0]) + noise / 2).clamp(0, 255) as u8;
    }
    let mut out = std::io::Cursor::new(Vec::new());
    blurred.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The first `per_class` Fashion-MNIST fixtures of every class, sorted.
pub fn fmnist_fixtures(per_class: usize) -> Vec<PathBuf> {
    let mut classes: Vec<PathBuf> =
        std::fs::read_dir(fixture("fmnist")).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    classes.sort();
    let mut out = Vec::new();
    for class in classes {
        let mut files: Vec<PathBuf> = std::fs::read_dir(class).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        out.extend(files.into_iter().take(per_class));
    }
    out
}
