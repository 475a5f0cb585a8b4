//! The scoring endpoints against the real bundled model, over real HTTP, with real photos.

mod common;

use common::{PHOTOS, Server, cosine, floats, read};
use serde_json::Value;

/// Section 1 of design.md written out independently of the crate, in f64, with D = all
/// features (the bundled model is uncalibrated): the reference the server must match.
fn reference_q(h: &[f64], eps: f64) -> (f64, usize, f64) {
    let d = h.len() as f64;
    let mu = h.iter().sum::<f64>() / d;
    let sigma = (h.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (d - 1.0)).sqrt();
    let active: Vec<f64> = h.iter().copied().filter(|&x| sigma > 0.0 && x > mu + eps * sigma).collect();
    let q = if active.is_empty() { 0.0 } else { active.iter().map(|x| x - mu).sum::<f64>() / active.len() as f64 };
    let z_max = (h.iter().copied().fold(f64::MIN, f64::max) - mu) / sigma;
    (q, active.len(), z_max)
}

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-6)
}

#[test]
fn photos_score_and_match_section_1_applied_to_their_embedding() {
    let s = Server::start(&[]);
    let mut distinct = std::collections::BTreeSet::new();
    for photo in PHOTOS {
        let r = s.post_image("/v1/score", photo, read(&format!("photos/{photo}")));
        assert_eq!(r.status(), 200);
        let score: Value = r.json().unwrap();
        assert_eq!(score["model"], "mobilenet_v2-imagenet");
        assert_eq!(score["calibrated"], false);
        assert!(score["likely_misclassified"].is_null() && score["p_misclassified"].is_null());
        assert!(score["risk_source"].is_null());
        assert!(score.get("embedding").is_none(), "/v1/score does not answer the embedding");
        for t in ["decode", "inference", "total"] {
            assert!(score["timings_ms"][t].as_f64().unwrap() > 0.0, "{t}: {score}");
        }

        let e: Value = s.post_image("/v1/embed", photo, read(&format!("photos/{photo}"))).json().unwrap();
        let h = floats(&e["embedding"]);
        assert_eq!(h.len(), 1280);
        assert!(h.iter().all(|&x| x >= 0.0), "pooled ReLU6 features are non-negative");
        let (q, active, z_max) = reference_q(&h, 4.0);
        let answered = score["q_score"].as_f64().unwrap();
        assert!(rel_close(answered, q, 1e-4), "{photo}: answered {answered}, section 1 gives {q}");
        assert_eq!(score["stats"]["active"].as_u64().unwrap() as usize, active, "{photo}");
        assert_eq!(score["stats"]["active_discriminative"], score["stats"]["active"], "D = all when uncalibrated");
        assert!(rel_close(score["stats"]["z_max"].as_f64().unwrap(), z_max, 1e-4));
        assert_eq!(e["q_score"], score["q_score"], "embed and score agree");

        let feats = score["discriminative_features"].as_array().unwrap();
        assert_eq!(feats.len(), active);
        let z: Vec<f64> = feats.iter().map(|f| f["z_score"].as_f64().unwrap()).collect();
        assert!(z.windows(2).all(|w| w[0] >= w[1]), "strongest first: {z:?}");
        assert!(z.iter().all(|&z| z > 4.0), "every feature of L is above mu + 4 sigma");
        for f in feats {
            let j = f["index"].as_u64().unwrap() as usize;
            assert!((f["activation"].as_f64().unwrap() - h[j]).abs() < 1e-6);
        }
        distinct.insert(answered.to_bits());
    }
    assert_eq!(distinct.len(), PHOTOS.len(), "different photos get different scores");
}

#[test]
fn embeddings_match_pytorch_golden_vectors() {
    let golden: Value = serde_json::from_slice(
        &std::fs::read(common::root().join("models/mobilenet_v2-imagenet/golden.json")).unwrap(),
    )
    .unwrap();
    let images = golden["images"].as_object().unwrap();
    assert_eq!(images.len(), PHOTOS.len());
    let s = Server::start(&[]);
    for (name, want) in images {
        let e: Value = s.post_image("/v1/embed", name, read(&format!("photos/{name}"))).json().unwrap();
        let c = cosine(&floats(&e["embedding"]), &floats(want));
        assert!(c >= 0.999, "{name}: cosine {c} with PyTorch's embedding");
    }
}

#[test]
fn raw_body_and_multipart_give_the_same_answer() {
    let s = Server::start(&[]);
    let jpeg = read("photos/china.jpg");
    let a: Value = s.post_image("/v1/score", "china.jpg", jpeg.clone()).json().unwrap();
    let r = s.post_raw("/v1/score?model=mobilenet_v2-imagenet", "image/jpeg", jpeg);
    assert_eq!(r.status(), 200);
    let b: Value = r.json().unwrap();
    assert_eq!(a["q_score"], b["q_score"]);
    assert_eq!(a["discriminative_features"], b["discriminative_features"]);
}

/// Every accepted format and pixel layout decodes, and decodes to the same picture: the
/// lossless re-encodings of chelsea.png embed identically, the lossy ones nearly so, and the
/// EXIF-rotated JPEG lands upright.
#[test]
fn every_format_and_pixel_layout_is_accepted() {
    let s = Server::start(&[]);
    let embed = |rel: &str| -> Vec<f64> {
        let r = s.post_image("/v1/embed", rel, read(rel));
        assert_eq!(r.status(), 200, "{rel}");
        floats(&r.json::<Value>().unwrap()["embedding"])
    };
    let png = embed("photos/chelsea.png");
    for (rel, min) in [
        ("formats/chelsea.bmp", 0.99999),
        ("formats/chelsea.tiff", 0.99999),
        ("formats/chelsea_rgba.png", 0.99999),
        ("formats/chelsea_rgb16.png", 0.99999),
        ("formats/chelsea.webp", 0.98),
        ("formats/chelsea_q95.jpg", 0.98),
        ("formats/chelsea.gif", 0.95),
        ("formats/chelsea_grey.png", 0.80),
    ] {
        let c = cosine(&embed(rel), &png);
        assert!(c >= min, "{rel}: cosine {c} < {min}");
    }
    // The EXIF-6 file stores the picture sideways; applied orientation makes it match the
    // upright JPEG far better than the raw sideways pixels would.
    let upright = embed("formats/chelsea_q95.jpg");
    let rotated = embed("formats/chelsea_exif6.jpg");
    let c = cosine(&rotated, &upright);
    assert!(c >= 0.97, "EXIF orientation not applied: cosine {c}");
}

#[test]
fn batch_answers_each_image_alone_in_order() {
    let s = Server::start(&[]);
    let mut form = reqwest::blocking::multipart::Form::new();
    let names = ["china.jpg", "truncated.jpg", "rocket.jpg", "not_an_image.txt", "coffee.png"];
    let files =
        ["photos/china.jpg", "bad/truncated.jpg", "photos/rocket.jpg", "bad/not_an_image.txt", "photos/coffee.png"];
    for (name, rel) in names.iter().zip(files) {
        form = form.part("image", reqwest::blocking::multipart::Part::bytes(read(rel)).file_name(name.to_string()));
    }
    let r = s.client().post(format!("{}/v1/score/batch", s.url)).multipart(form).send().unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().unwrap();
    let results = b["results"].as_array().unwrap();
    let ids: Vec<&str> = results.iter().map(|x| x["id"].as_str().unwrap()).collect();
    assert_eq!(ids, names);
    assert_eq!(results[1]["error"]["code"], "undecodable_image");
    assert_eq!(results[3]["error"]["code"], "unsupported_image_format");
    let single: Value = s.post_image("/v1/score", "china.jpg", read("photos/china.jpg")).json().unwrap();
    assert_eq!(results[0]["q_score"], single["q_score"], "batching does not change a score");
    for i in [0, 2, 4] {
        assert!(results[i]["q_score"].is_number() && results[i].get("error").is_none());
    }
    let sum = &b["summary"];
    assert_eq!((sum["count"].as_u64(), sum["scored"].as_u64(), sum["failed"].as_u64()), (Some(5), Some(3), Some(2)));
    assert_eq!(sum["flagged"], 0);
    let mean = [0, 2, 4].iter().map(|&i| results[i]["q_score"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((sum["mean_q_score"].as_f64().unwrap() - mean).abs() < 1e-4);
}

#[test]
fn json_batch_with_base64_and_a_bad_item() {
    use base64::Engine;
    let b64 = |rel: &str| base64::engine::general_purpose::STANDARD.encode(read(rel));
    let s = Server::start(&["--max-batch", "2"]);
    let body = serde_json::json!({"images": [
        {"id": "a", "data": b64("photos/flower.jpg")},
        {"id": "b", "data": "***not base64***"},
        {"data": b64("photos/astronaut.png")},
        {"id": "d", "data": b64("bad/bomb_100000x100000.png")},
        {"id": "e", "data": b64("photos/chelsea.png")},
    ]});
    let r = s.client().post(format!("{}/v1/score/batch", s.url)).json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().unwrap();
    let res = b["results"].as_array().unwrap();
    assert_eq!(res.iter().map(|x| x["id"].as_str().unwrap()).collect::<Vec<_>>(), ["a", "b", "2", "d", "e"]);
    assert_eq!(res[1]["error"]["code"], "bad_request");
    assert_eq!(res[3]["error"]["code"], "too_many_pixels");
    assert_eq!(b["summary"]["scored"], 3);
    // --max-batch 2 split the three good images across two ONNX Runtime runs.
    let metrics = s.get("/metrics").text().unwrap();
    assert!(metrics.contains("qscore_batch_size_count{model=\"mobilenet_v2-imagenet\"} 2"), "{metrics}");
    assert!(metrics.contains("qscore_batch_size_sum{model=\"mobilenet_v2-imagenet\"} 3"), "{metrics}");
}

#[test]
fn models_are_listed_and_described() {
    let s = Server::start(&[]);
    let list: Value = s.get("/v1/models").json().unwrap();
    assert_eq!(list["default"], "mobilenet_v2-imagenet");
    let m = list["models"].as_array().unwrap().iter().find(|m| m["name"] == "mobilenet_v2-imagenet").expect("listed");
    assert_eq!(m["embedding_dim"], 1280);
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["input"]["height"], 224);
    assert_eq!(m["input"]["resize_shorter"], 256);
    assert_eq!(m["calibrated"], false);
    assert!(m["calibration"].is_null());
    let one: Value = s.get("/v1/models/mobilenet_v2-imagenet").json().unwrap();
    assert_eq!(&one, m);
    common::assert_error(s.get("/v1/models/resnet-9000"), 404, "unknown_model");
}

#[test]
fn cli_score_prints_the_same_json_as_the_server() {
    let out = common::qscore_bin()
        .args([
            "score",
            "tests/fixtures/photos/rocket.jpg",
            "tests/fixtures/bad/truncated.jpg",
            "tests/fixtures/photos/coffee.png",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a failed file makes the exit status 1");
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["error"]["code"], "undecodable_image");
    assert_eq!(lines[1]["file"], "tests/fixtures/bad/truncated.jpg");
    let s = Server::start(&[]);
    for (i, photo) in [(0, "rocket.jpg"), (2, "coffee.png")] {
        let server: Value = s.post_image("/v1/score", photo, read(&format!("photos/{photo}"))).json().unwrap();
        assert_eq!(lines[i]["q_score"], server["q_score"], "{photo}");
        assert_eq!(lines[i]["discriminative_features"], server["discriminative_features"]);
    }
}

/// Found by a hostile client: JSON batch `data` was read only as unwrapped, padded, standard
/// base64. MIME-wrapped (the `base64` CLI, Python's encodebytes, Java's MIME encoder), a data
/// URI (a browser's FileReader), unpadded and URL-safe base64 all answer the plain form's score.
#[test]
fn every_base64_form_scores_the_same() {
    use base64::Engine;
    let s = Server::start(&[]);
    let png = read("fmnist/bag/t10k-00030.png");
    let plain = base64::engine::general_purpose::STANDARD.encode(&png);
    let url = base64::engine::general_purpose::URL_SAFE.encode(&png);
    let wrapped: String =
        plain.as_bytes().chunks(76).map(|c| format!("{}\n", std::str::from_utf8(c).unwrap())).collect();
    let forms = [
        ("plain", plain.clone()),
        ("mime", wrapped.clone()),
        ("mime crlf", wrapped.replace('\n', "\r\n")),
        ("data uri", format!("data:image/png;base64,{plain}")),
        ("no padding", plain.trim_end_matches('=').to_owned()),
        ("url-safe", url.clone()),
        ("url-safe no padding", url.trim_end_matches('=').to_owned()),
    ];
    let images: Vec<Value> = forms.iter().map(|(id, data)| serde_json::json!({"id": id, "data": data})).collect();
    let r: Value = s
        .client()
        .post(format!("{}/v1/score/batch?model=fmnist-simclr", s.url))
        .json(&serde_json::json!({ "images": images }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), forms.len());
    let q = results[0]["q_score"].as_f64().expect("the plain form scores");
    for x in results {
        assert_eq!(x["q_score"].as_f64(), Some(q), "{x}");
    }
    // KServe's JSON BYTES elements read the same forms.
    let data: Vec<&str> = forms.iter().map(|(_, d)| d.as_str()).collect();
    let body =
        serde_json::json!({"inputs": [{"name": "image", "shape": [data.len()], "datatype": "BYTES", "data": data}]});
    let r: Value =
        s.client().post(format!("{}/v2/models/fmnist-simclr/infer", s.url)).json(&body).send().unwrap().json().unwrap();
    for x in r["outputs"][0]["data"].as_array().unwrap() {
        assert!((x.as_f64().unwrap() - q).abs() < 1e-5, "{r}");
    }
}
