//! A real Prometheus server (Debian's package, started on loopback) with the shipped rules, for
//! the tests that check what production alerting reads; stopped and its folder removed on drop.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::root;

/// A running Prometheus.
pub struct Prometheus {
    child: std::process::Child,
    /// Its base URL.
    pub url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file of deploy/prometheus/ as shipped.
pub fn shipped(file: &str) -> String {
    std::fs::read_to_string(root().join("deploy/prometheus").join(file)).unwrap()
}

/// `text` with `from` replaced by `to`; `from` must be there, so a test never silently runs on
/// a shipped file that changed under it.
pub fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the shipped Prometheus files changed: no `{from}`");
    text.replace(from, to)
}

impl Prometheus {
    /// Starts Prometheus on `config` (prometheus.yml, loading `alerts.yml` beside it) and
    /// `alerts`, in a scratch folder named by `tag`; answers once it is ready.
    pub fn start(tag: &str, config: &str, alerts: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qscore-prometheus-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        std::fs::write(dir.join("alerts.yml"), alerts).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(
                "the Prometheus server is needed for this test: `make tools` installs it (Debian package prometheus)",
            );
        let p = Self { child, url: format!("http://127.0.0.1:{port}"), dir };
        let ready = Instant::now();
        while reqwest::blocking::get(format!("{}/-/ready", p.url)).map_or(true, |r| r.status() != 200) {
            assert!(ready.elapsed() < Duration::from_secs(30), "Prometheus did not become ready in 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// `GET /api/v1/{path}` with `query`: its `data`, once its `status` is checked.
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let v: Value = reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"].clone()
    }
}
