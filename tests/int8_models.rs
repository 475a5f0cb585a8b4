//! Every shipped int8 model (`models/<name>-int8/`) keeps the science of its fp32 model on the
//! committed fixtures: served side by side by a real server, the two agree on the Q-Score's
//! ranking, on the likely-misclassified flag (each with its own calibration) and on the
//! embedding. A broken quantisation fails here; so does an int8 folder left behind after its fp32
//! model was retrained (its provenance names the fp32 model.onnx's SHA-256). The check itself is
//! shown to have teeth: two different encoders fail it.

mod common;

use common::{PHOTOS, Server, cosine, floats, read, root};
use reqwest::blocking::multipart::{Form, Part};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What a shipped int8 model must keep, on the fixtures. models/README.md has the held-out
/// figures (5,000 test images per Fashion-MNIST model) these bounds sit under.
struct Bounds {
    spearman: f64,
    flag_agreement: f64,
    cosine_mean: f64,
    cosine_min: f64,
}

const FMNIST: Bounds = Bounds { spearman: 0.97, flag_agreement: 0.95, cosine_mean: 0.999, cosine_min: 0.995 };
/// Six photos: a Spearman over six values says little, so the embedding carries the check.
const PHOTO: Bounds = Bounds { spearman: 0.8, flag_agreement: 1.0, cosine_mean: 0.99, cosine_min: 0.98 };

/// What one model answers for every image: Q-Score, flag (None when uncalibrated), embedding.
struct Answers {
    q: Vec<f64>,
    flag: Vec<Option<bool>>,
    h: Vec<Vec<f64>>,
}

/// The 200 Fashion-MNIST fixtures (class/file order) or the six photos.
fn images(fmnist: bool) -> Vec<(String, Vec<u8>)> {
    if !fmnist {
        return PHOTOS.iter().map(|p| (p.to_string(), read(&format!("photos/{p}")))).collect();
    }
    let mut out = Vec::new();
    let mut classes: Vec<_> =
        std::fs::read_dir(root().join("tests/fixtures/fmnist")).unwrap().map(|e| e.unwrap().path()).collect();
    classes.sort();
    for class in classes {
        let mut files: Vec<_> = std::fs::read_dir(&class).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        out.extend(files.into_iter().map(|f| (f.display().to_string(), std::fs::read(&f).unwrap())));
    }
    out
}

fn answers(s: &Server, model: &str, images: &[(String, Vec<u8>)]) -> Answers {
    let mut a = Answers { q: Vec::new(), flag: Vec::new(), h: Vec::new() };
    for (id, bytes) in images {
        let form = Form::new().part("image", Part::bytes(bytes.clone()).file_name(id.clone()));
        let r = s.client().post(format!("{}/v1/embed?model={model}", s.url)).multipart(form).send().unwrap();
        assert_eq!(r.status(), 200, "{model} {id}");
        let e: Value = r.json().unwrap();
        a.q.push(e["q_score"].as_f64().unwrap());
        a.flag.push(e["likely_misclassified"].as_bool());
        a.h.push(floats(&e["embedding"]));
    }
    a
}

/// Average ranks: ties share the mean of the ranks they span.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(&ra), mean(&rb));
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let var = |v: &[f64], m: f64| v.iter().map(|x| (x - m).powi(2)).sum::<f64>();
    cov / (var(&ra, ma) * var(&rb, mb)).sqrt()
}

/// Every bound `b` the pair misses, as sentences (empty: it keeps the science).
fn misses(a: &Answers, b: &Answers, bounds: &Bounds) -> Vec<String> {
    let mut out = Vec::new();
    let rho = spearman(&a.q, &b.q);
    if rho.is_nan() || rho < bounds.spearman {
        out.push(format!("Spearman of Q {rho:.4} < {}", bounds.spearman));
    }
    let flags: Vec<(bool, bool)> = a.flag.iter().zip(&b.flag).filter_map(|(x, y)| Some(((*x)?, (*y)?))).collect();
    assert!(flags.is_empty() || flags.len() == a.flag.len(), "one model of the pair is calibrated, the other not");
    if !flags.is_empty() {
        let agree = flags.iter().filter(|(x, y)| x == y).count() as f64 / flags.len() as f64;
        if agree < bounds.flag_agreement {
            out.push(format!("flag agreement {agree:.4} < {}", bounds.flag_agreement));
        }
    }
    let cos: Vec<f64> = a.h.iter().zip(&b.h).map(|(x, y)| cosine(x, y)).collect();
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    if mean < bounds.cosine_mean || min < bounds.cosine_min {
        out.push(format!("embedding cosine mean {mean:.5}, min {min:.5}"));
    }
    out
}

fn shipped_int8() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with("-int8"))
        .collect();
    names.sort();
    names
}

#[test]
fn every_shipped_int8_model_keeps_its_fp32_models_science() {
    let s = Server::start(&[]);
    let list: Value = s.get("/v1/models").json().unwrap();
    let loaded: Vec<&str> = list["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    for int8 in shipped_int8() {
        let fp32 = int8.trim_end_matches("-int8");
        assert!(loaded.contains(&int8.as_str()) && loaded.contains(&fp32), "{int8} or {fp32} not loaded: {loaded:?}");
        let dir = root().join("models");
        let toml = std::fs::read_to_string(dir.join(&int8).join("model.toml")).unwrap();
        let fp32_sha: String = Sha256::digest(std::fs::read(dir.join(fp32).join("model.onnx")).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            toml.contains(&fp32_sha),
            "{int8}'s provenance does not name {fp32}'s model.onnx (sha256 {fp32_sha}): rebuild it with `make int8-models`"
        );
        let calibrated = dir.join(fp32).join("calibration.json").exists();
        assert_eq!(dir.join(&int8).join("calibration.json").exists(), calibrated, "{int8}: calibrate it as {fp32} is");

        let imgs = images(calibrated);
        let (a, b) = (answers(&s, fp32, &imgs), answers(&s, &int8, &imgs));
        let missed = misses(&a, &b, if calibrated { &FMNIST } else { &PHOTO });
        assert!(missed.is_empty(), "{int8} does not keep {fp32}'s science on the fixtures: {}", missed.join("; "));
    }
}

/// The check has teeth: two different encoders of the same data, calibrated alike, fail it.
#[test]
fn the_agreement_check_rejects_a_different_model() {
    let s = Server::start(&[]);
    let imgs = images(true);
    let (a, b) = (answers(&s, "fmnist-simclr", &imgs), answers(&s, "fmnist-vicreg", &imgs));
    let missed = misses(&a, &b, &FMNIST);
    assert!(missed.len() >= 2, "SimCLR and VICReg pass as one model: {missed:?}");
    assert!(misses(&a, &a, &FMNIST).is_empty(), "a model agrees with itself");
}

#[test]
fn ranks_and_spearman_by_hand() {
    assert_eq!(ranks(&[10.0, 0.0, 0.0, 5.0]), vec![4.0, 1.5, 1.5, 3.0]);
    assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
    assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
}
