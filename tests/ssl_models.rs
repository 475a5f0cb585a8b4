//! The bundled self-supervised Fashion-MNIST encoders: each loads, is listed, matches its
//! PyTorch embeddings, and scores the 200 committed t10k fixtures (20 per class).

mod common;

use common::{Server, cosine, floats, root};
use reqwest::blocking::multipart::{Form, Part};
use serde_json::Value;

const METHODS: [&str; 8] = ["simclr", "byol", "vicreg", "barlow_twins", "moco", "simsiam", "swav", "dino"];
const CLASSES: [&str; 10] =
    ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"];

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for class in CLASSES {
        let dir = root().join("tests/fixtures/fmnist").join(class);
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert_eq!(files.len(), 20, "{}", dir.display());
        for f in files {
            out.push((format!("{class}/{}", f.file_name().unwrap().to_str().unwrap()), std::fs::read(&f).unwrap()));
        }
    }
    out
}

#[test]
fn every_ssl_encoder_is_served_and_scores_the_fixtures() {
    let s = Server::start(&[]);
    let list: Value = s.get("/v1/models").json().unwrap();
    let names: Vec<&str> = list["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(list["default"], "mobilenet_v2-imagenet");
    let images = fixtures();
    for method in METHODS {
        let name = format!("fmnist-{method}");
        assert!(names.contains(&name.as_str()), "{name} is not loaded: {names:?}");
        let info: Value = s.get(&format!("/v1/models/{name}")).json().unwrap();
        assert_eq!(info["input"]["channels"], 1);
        assert_eq!(info["input"]["color"], "grey");
        assert_eq!((info["input"]["height"].as_u64(), info["input"]["width"].as_u64()), (Some(28), Some(28)));
        let dim = info["embedding_dim"].as_u64().unwrap();

        let mut form = Form::new();
        for (id, bytes) in &images {
            form = form.part("image", Part::bytes(bytes.clone()).file_name(id.clone()));
        }
        let r = s.client().post(format!("{}/v1/score/batch?model={name}", s.url)).multipart(form).send().unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let b: Value = r.json().unwrap();
        assert_eq!(b["summary"]["scored"], 200, "{name}: {}", b["summary"]);
        let scores: Vec<f64> =
            b["results"].as_array().unwrap().iter().map(|x| x["q_score"].as_f64().unwrap()).collect();
        assert!(scores.iter().all(|q| q.is_finite() && *q >= 0.0));
        let distinct: std::collections::BTreeSet<u64> = scores.iter().map(|q| q.to_bits()).collect();
        assert!(distinct.len() > 150, "{name}: only {} distinct scores over 200 images", distinct.len());
        for r in b["results"].as_array().unwrap() {
            assert_eq!(r["model"], name.as_str());
            assert_eq!(r["stats"]["dim"].as_u64(), Some(dim));
        }

        let golden: Value =
            serde_json::from_slice(&std::fs::read(root().join(format!("models/{name}/golden.json"))).unwrap()).unwrap();
        let golden = golden["images"].as_object().unwrap();
        assert_eq!(golden.len(), CLASSES.len(), "{name}: one golden embedding per class");
        for (id, want) in golden {
            let bytes = &images.iter().find(|(i, _)| i == id).unwrap().1;
            let e: Value = s.post_raw(&format!("/v1/embed?model={name}"), "image/png", bytes.clone()).json().unwrap();
            let c = cosine(&floats(&e["embedding"]), &floats(want));
            assert!(c >= 0.999, "{name} {id}: cosine {c} with PyTorch");
        }
    }
}

/// The bundled calibrations' flags are worth something on their held-out test part: flagged
/// images are misclassified at least 3x as often as the others, and p_misclassified's AUPRC is
/// at least 3x the base rate for the default model of `make run` (fmnist-simclr) and at least
/// 2.5x for the others (BYOL's is 2.8x: reported, not hidden). Served, the flag does the same on
/// the committed fixtures: the probe's class is wrong far more often among flagged images.
#[test]
fn bundled_calibrations_flag_what_the_probe_gets_wrong() {
    let s = Server::start(&[]);
    let images = fixtures();
    for method in METHODS {
        let name = format!("fmnist-{method}");
        let cal: Value =
            serde_json::from_slice(&std::fs::read(root().join(format!("models/{name}/calibration.json"))).unwrap())
                .unwrap();
        let e = &cal["evaluation"];
        let lift = e["flag"]["lift"].as_f64().unwrap();
        let auprc = e["p_misclassified"]["auprc"].as_f64().unwrap();
        let base = e["error_rate"].as_f64().unwrap();
        assert!(lift >= 3.0, "{name}: flagged images are wrong only {lift:.2}x as often");
        let floor = if name == "fmnist-simclr" { 3.0 } else { 2.5 };
        assert!(auprc >= floor * base, "{name}: AUPRC {auprc:.3} against a base rate of {base:.3}");

        let info: Value = s.get(&format!("/v1/models/{name}")).json().unwrap();
        assert_eq!(info["calibrated"], true, "{name} ships its calibration.json");
        assert_eq!(info["calibration"]["evaluation"], *e);

        let mut form = Form::new();
        for (id, bytes) in &images {
            form = form.part("image", Part::bytes(bytes.clone()).file_name(id.clone()));
        }
        let b: Value = s
            .client()
            .post(format!("{}/v1/score/batch?model={name}", s.url))
            .multipart(form)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let (mut wrong, mut count) = ([0_u32; 2], [0_u32; 2]);
        for r in b["results"].as_array().unwrap() {
            assert_eq!(r["risk_source"], cal["risk_source"]);
            let flagged = usize::from(r["likely_misclassified"].as_bool().unwrap());
            let truth = r["id"].as_str().unwrap().split('/').next().unwrap();
            count[flagged] += 1;
            wrong[flagged] += u32::from(r["predicted_class"].as_str().unwrap() != truth);
        }
        assert_eq!(b["summary"]["flagged"].as_u64(), Some(u64::from(count[1])));
        let rate = |i: usize| f64::from(wrong[i]) / f64::from(count[i].max(1));
        assert!(count[1] > 0 && rate(1) >= 2.0 * rate(0), "{name}: wrong {wrong:?} of {count:?} (unflagged, flagged)");
    }
}
