//! Drift across replicas, end to end: three real `qscore serve` processes and a real Prometheus
//! (Debian's) loading the shipped rules. Replica C answers a stream alone; replicas A and B answer
//! the same stream split between them. The fleet rules (group qscore-drift-fleet of
//! deploy/prometheus/alerts.yml) must give the pair {A, B} the figures of C, and those must be
//! C's own /v1/drift figures, which src/drift.rs computes from the same bins.

mod common;

use std::time::{Duration, Instant};

use common::{
    Server,
    prometheus::{Prometheus, replace, shipped},
    root,
};
use reqwest::blocking::multipart::{Form, Part};
use serde_json::Value;

const MODEL: &str = "fmnist-simclr";

/// The committed Fashion-MNIST fixtures (held-out images, like the reference's), then the first
/// 100 of them blurred and noised (as tests/production.rs degrades them): a stream that drifts
/// two thirds of the way.
fn stream() -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("tests/fixtures/fmnist"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().map(|f| f.unwrap().path()))
        .collect();
    files.sort();
    let clean: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut seed = 12345_u32;
    let degraded: Vec<Vec<u8>> = clean.iter().take(100).map(|bytes| common::degrade(bytes, &mut seed)).collect();
    [clean, degraded].concat()
}

/// A server holding only the model under test (one model loads faster than the whole folder).
fn replica(models: &std::path::Path) -> Server {
    Server::start_with_models(models, &["--model", MODEL, "--drift-window", "1000"])
}

fn post(s: &Server, images: &[Vec<u8>]) {
    for chunk in images.chunks(100) {
        let form = chunk
            .iter()
            .enumerate()
            .fold(Form::new(), |f, (i, b)| f.part("image", Part::bytes(b.clone()).file_name(format!("{i}.png"))));
        let r = s.client().post(format!("{}/v1/score/batch?model={MODEL}", s.url)).multipart(form).send().unwrap();
        assert_eq!(r.status(), 200);
    }
}

fn drift(s: &Server) -> Value {
    let d: Value = s.get(&format!("/v1/drift?model={MODEL}")).json().unwrap();
    d["models"][0].clone()
}

/// Prometheus on loopback, scraping A and B as `fleet="pair"` and C as `fleet="single"` every
/// second and evaluating the shipped rules every second.
struct Fleet(Prometheus);

impl Fleet {
    fn start(pair: [&str; 2], single: &str) -> Self {
        let targets = format!(
            "- targets: [\"{}\", \"{}\"]\n        labels: {{fleet: pair}}\n      - targets: [\"{single}\"]\n        labels: {{fleet: single}}",
            pair[0], pair[1]
        );
        let config = replace(&shipped("prometheus.yml"), "- targets: [\"localhost:8080\"]", &targets);
        let config = replace(&config, "scrape_interval: 15s", "scrape_interval: 1s\n  evaluation_interval: 1s");
        Self(Prometheus::start("fleet", &config, &shipped("alerts.yml")))
    }

    /// `expr` now, as (fleet label, value) pairs.
    fn query(&self, expr: &str) -> Vec<(String, f64)> {
        let data = self.0.api("query", &[("query", expr)]);
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let fleet = r["metric"]["fleet"].as_str().unwrap_or_default().to_owned();
                (fleet, r["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }

    /// One fleet-wide recorded series of the model, for `fleet`.
    fn fleet(&self, record: &str, fleet: &str) -> f64 {
        let got = self.query(&format!("{record}{{model=\"{MODEL}\",fleet=\"{fleet}\"}}"));
        assert_eq!(got.len(), 1, "{record} for {fleet}: {got:?}");
        got[0].1
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn two_replicas_merge_to_the_single_replica_figures() {
    let start = Instant::now();
    let models = std::env::temp_dir().join(format!("qscore-fleet-models-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&models);
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(root().join("models").join(MODEL), models.join(MODEL)).unwrap();
    let [a, b, c] = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..3).map(|_| scope.spawn(|| replica(&models))).collect();
        let mut started = starting.into_iter().map(|h| h.join().unwrap());
        [(); 3].map(|()| started.next().unwrap())
    });
    let host = |s: &Server| s.url.trim_start_matches("http://").to_owned();
    let prometheus = Fleet::start([&host(&a), &host(&b)], &host(&c));

    // C answers the whole stream; A its first half (all clean), B the rest (mostly degraded).
    let images = stream();
    let n = images.len();
    std::thread::scope(|scope| {
        scope.spawn(|| post(&c, &images));
        scope.spawn(|| post(&a, &images[..n / 2]));
        post(&b, &images[n / 2..]);
    });

    // Wait until every replica's window is scraped whole and the rules ran on it.
    let waited = Instant::now();
    loop {
        let got = prometheus.query(&format!("model:qscore_drift_window_images:sum{{model=\"{MODEL}\"}}"));
        if got.len() == 2 && got.iter().all(|(_, v)| *v == n as f64) {
            break;
        }
        assert!(waited.elapsed() < Duration::from_secs(30), "the fleet windows never reached {n}: {got:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let rules = prometheus.0.api("rules", &[]);
    let group = rules["groups"].as_array().unwrap().iter().find(|g| g["name"] == "qscore-drift-fleet").unwrap();
    for rule in group["rules"].as_array().unwrap() {
        assert_eq!(rule["health"], "ok", "a fleet rule does not evaluate: {rule}");
    }

    let (da, db, dc) = (drift(&a), drift(&b), drift(&c));
    assert_eq!(dc["window_images"], n);

    // The counts add up: A's and B's windows are C's, bin by bin.
    let bins = |d: &Value| -> Vec<(u64, f64)> {
        d["counts"]["score_bins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["window_images"].as_u64().unwrap(), b["reference_ratio"].as_f64().unwrap()))
            .collect()
    };
    let (ba, bb, bc) = (bins(&da), bins(&db), bins(&dc));
    assert!(bc.len() > 2 && bc.len() <= 10, "{bc:?}");
    for k in 0..bc.len() {
        assert_eq!(ba[k].0 + bb[k].0, bc[k].0, "bin {k}: {ba:?} + {bb:?} != {bc:?}");
        assert_eq!((ba[k].1, bb[k].1), (bc[k].1, bc[k].1), "the replicas share the reference");
    }
    let count = |d: &Value, f: &str| d["counts"][f].as_u64().unwrap();
    for f in ["flagged_images", "p_misclassified_images"] {
        assert_eq!(count(&da, f) + count(&db, f), count(&dc, f), "{f}");
    }

    // Prometheus's fleet figures: the pair's equal the single replica's, which equal C's own.
    let figures = [
        ("model:qscore_drift_psi:fleet", "psi"),
        ("model:qscore_drift_flagged_ratio:fleet", "flagged_ratio"),
        ("model:qscore_drift_mean_p_misclassified:fleet", "mean_p_misclassified"),
    ];
    for (record, field) in figures {
        let (pair, single) = (prometheus.fleet(record, "pair"), prometheus.fleet(record, "single"));
        let direct = dc[field].as_f64().unwrap();
        eprintln!("{field}: pair {pair}, single {single}, C's /v1/drift {direct}, A {}, B {}", da[field], db[field]);
        assert!(close(pair, single), "{field}: pair {pair}, single {single}");
        assert!(close(single, direct), "{field}: Prometheus {single}, /v1/drift {direct}");
    }
    // The halves drift differently, and the fleet PSI is neither's (nor does the rule read one
    // replica's).
    let psi = |d: &Value| d["psi"].as_f64().unwrap();
    assert!(psi(&db) > psi(&da) + 0.25, "A {} and B {} should differ", psi(&da), psi(&db));
    assert!((psi(&dc) - psi(&da)).abs() > 0.02 && (psi(&dc) - psi(&db)).abs() > 0.02);

    // The binned KS is read at the deciles: at most the exact KS, below it by at most one bin's
    // largest share.
    let (pair, single) = (
        prometheus.fleet("model:qscore_drift_ks_binned:fleet", "pair"),
        prometheus.fleet("model:qscore_drift_ks_binned:fleet", "single"),
    );
    assert!(close(pair, single), "binned KS: pair {pair}, single {single}");
    let exact = dc["ks"].as_f64().unwrap();
    let widest = bc.iter().map(|&(w, r)| (w as f64 / n as f64).max(r)).fold(0.0, f64::max);
    eprintln!("KS: binned {single}, exact {exact}, widest bin {widest}");
    assert!(
        single <= exact + 1e-9 && exact <= single + widest + 1e-9,
        "binned {single}, exact {exact}, widest {widest}"
    );
    assert!(single > 0.1, "the binned KS misses the degraded third of the stream: {single}");

    std::fs::remove_dir_all(&models).unwrap();
    eprintln!("took {:?}", start.elapsed());
}
