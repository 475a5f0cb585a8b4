//! `POST /v1/explain` against a real server, real bundled models and real ONNX Runtime: the
//! answer's shape, the PNG overlay, every client bound, and two sanity checks that a heatmap
//! means something:
//!
//! 1. model randomisation (Adebayo et al., 2018): the maps of a copy of fmnist-simclr with its
//!    weights redrawn at random (`models/recipes/randomise_weights.py`) must differ from the
//!    trained model's for the same feature of the same image;
//! 2. deletion: on many fixture images, occluding the hottest region lowers the feature more
//!    than occluding a random region of the same size, checked outside the explanation code (the
//!    region is painted into the PNG and the image embedded with `/v1/embed`).

mod common;

use std::{io::Cursor, path::PathBuf, process::Command};

use common::{Server, assert_error, fmnist_fixtures, root};
use serde_json::Value;

const MODEL: &str = "fmnist-simclr";

fn explain(server: &Server, query: &str, bytes: Vec<u8>) -> Value {
    let r = server.post_image(&format!("/v1/explain?{query}"), "x.png", bytes);
    let status = r.status();
    let text = r.text().unwrap();
    assert_eq!(status, 200, "{query}: {text}");
    serde_json::from_str(&text).unwrap()
}

fn heatmap(feature: &Value) -> Vec<f64> {
    common::floats(&feature["heatmap"])
}

fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let (va, vb): (f64, f64) = (a.iter().map(|x| (x - ma).powi(2)).sum(), b.iter().map(|y| (y - mb).powi(2)).sum());
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

#[test]
fn explain_answers_a_heatmap_per_discriminative_feature_and_a_png() {
    let server = Server::start(&["--model", MODEL]);
    let image = std::fs::read(&fmnist_fixtures(1)[0]).unwrap();
    let v = explain(&server, &format!("model={MODEL}"), image.clone());
    assert_eq!(v["method"], "occlusion");
    assert_eq!(v["fill"], "mean");
    assert_eq!(v["occlusion"], serde_json::json!({"height": 28, "width": 28, "patch": 4, "stride": 2}));
    assert_eq!(v["grid"], serde_json::json!({"rows": 14, "cols": 14, "cell_px": 2}));
    assert_eq!(v["passes"], 169);
    let fired: Vec<u64> = v["score"]["discriminative_features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["index"].as_u64().unwrap())
        .collect();
    let mapped: Vec<u64> = v["features"].as_array().unwrap().iter().map(|f| f["index"].as_u64().unwrap()).collect();
    assert!(!fired.is_empty(), "{v}");
    assert_eq!(mapped, fired.into_iter().take(16).collect::<Vec<_>>(), "the default is L ∩ D, strongest first");
    for f in v["features"].as_array().unwrap() {
        assert_eq!(f["discriminative"], true);
        assert_eq!(f["active"], true);
        assert_eq!(heatmap(f).len(), 196);
        let hot = &f["hottest"];
        assert_eq!(hot["width"], 2);
        let max = heatmap(f).into_iter().fold(f64::MIN, f64::max);
        assert!((hot["value"].as_f64().unwrap() - max).abs() < 1e-6);
    }

    // Chosen features, black fill, a patch and stride of the client's.
    let v = explain(&server, "features=0,5,127&patch=7&stride=7&fill=black", image.clone());
    assert_eq!(v["passes"], 16);
    assert_eq!(v["grid"]["rows"], 4);
    let mapped: Vec<u64> = v["features"].as_array().unwrap().iter().map(|f| f["index"].as_u64().unwrap()).collect();
    assert_eq!(mapped, [0, 5, 127]);

    // The overlay: one panel per feature, enlarged to 224 px.
    let part = reqwest::blocking::multipart::Part::bytes(image.clone()).file_name("x.png");
    let r = server
        .client()
        .post(format!("{}/v1/explain?features=3,9", server.url))
        .header("accept", "image/png")
        .multipart(reqwest::blocking::multipart::Form::new().part("image", part))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["qscore-explain-features"], "3,9");
    let png = image::load_from_memory(&r.bytes().unwrap()).unwrap();
    assert_eq!((png.width(), png.height()), (2 * 224 + 4, 224));

    // The passes are counted per model.
    let metrics = server.get("/metrics").text().unwrap();
    let passes = metrics
        .lines()
        .find(|l| l.starts_with(&format!("qscore_explain_passes_total{{model=\"{MODEL}\"}}")))
        .unwrap_or_else(|| panic!("no explain passes in:\n{metrics}"));
    assert!(passes.ends_with(" 357"), "169 + 1, 16 + 1, 169 + 1 passes: {passes}");
}

#[test]
fn every_client_bound_is_a_json_error_before_any_work() {
    let server = Server::start(&["--model", MODEL, "--max-explain-passes", "200"]);
    let image = std::fs::read(&fmnist_fixtures(1)[0]).unwrap();
    let post = |q: &str| server.post_image(&format!("/v1/explain?{q}"), "x.png", image.clone());
    let many = (0..10_000).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    for q in [
        "features=",
        "features=1,1",
        "features=128",
        "features=-1",
        "features=1;2",
        "features=99999999999999999999999999999",
        &format!("features={many}"),
        "patch=0",
        "patch=29",
        "stride=0",
        "patch=4&stride=5",
        "patch=1&stride=1",
        "patch=2&stride=1",
    ] {
        assert_error(post(q), 400, "invalid_explain_parameters");
    }
    for q in ["patch=-1", "patch=99999999999999999999999", "fill=grey", "feature=1", "patch=a"] {
        assert_error(post(q), 400, "bad_request");
    }
    assert_error(server.post_image("/v1/explain?model=nope", "x.png", image.clone()), 404, "unknown_model");
    assert_error(server.post_raw("/v1/explain", "image/png", Vec::new()), 400, "empty_image");
    assert_error(
        server.post_raw("/v1/explain", "image/png", b"not an image".to_vec()),
        415,
        "unsupported_image_format",
    );
    assert_error(server.post_raw("/v1/explain", "text/plain", b"hi".to_vec()), 415, "unsupported_media_type");
    let two = reqwest::blocking::multipart::Form::new()
        .part("image", reqwest::blocking::multipart::Part::bytes(image.clone()).file_name("a.png"))
        .part("image", reqwest::blocking::multipart::Part::bytes(image.clone()).file_name("b.png"));
    let r = server.client().post(format!("{}/v1/explain", server.url)).multipart(two).send().unwrap();
    assert_error(r, 400, "bad_request");
    for accept in ["text/html", "image/jpeg", "application/json;q=0, image/png;q=0"] {
        let r = server
            .client()
            .post(format!("{}/v1/explain", server.url))
            .header("accept", accept)
            .header("content-type", "image/png")
            .body(image.clone())
            .send()
            .unwrap();
        assert_error(r, 406, "not_acceptable");
    }
    assert_eq!(server.post_raw("/v1/explain", "image/png", image).status(), 200, "the server still answers");
}

/// Sanity check 1: the maps of a model with random weights are not the trained model's.
#[test]
fn a_randomised_model_explains_differently() {
    let models = std::env::temp_dir().join(format!("explain-models-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&models);
    std::fs::create_dir_all(&models).unwrap();
    let trained = models.join(MODEL);
    std::fs::create_dir_all(&trained).unwrap();
    for f in ["model.onnx", "model.toml", "calibration.json"] {
        std::fs::copy(root().join("models").join(MODEL).join(f), trained.join(f)).unwrap();
    }
    let random = models.join(format!("{MODEL}-random"));
    let ok = Command::new(root().join(".venv-test/bin/python"))
        .arg(root().join("models/recipes/randomise_weights.py"))
        .args(["--model"])
        .arg(&trained)
        .arg("--out")
        .arg(&random)
        .status()
        .expect("run randomise_weights.py (make tools installs onnx into .venv-test)");
    assert!(ok.success());
    let server = Server::start_with_models(&models, &["--model", MODEL]);

    let (mut same, mut rs, mut flat) = (Vec::new(), Vec::new(), 0);
    for file in fmnist_fixtures(5) {
        let image = std::fs::read(&file).unwrap();
        let t = explain(&server, &format!("model={MODEL}"), image.clone());
        let Some(first) = t["features"].as_array().unwrap().first() else { continue };
        let j = first["index"].as_u64().unwrap();
        let again = explain(&server, &format!("model={MODEL}&features={j}"), image.clone());
        same.push(pearson(&heatmap(first), &heatmap(&again["features"][0])).unwrap_or(1.0));
        let r = explain(&server, &format!("model={MODEL}-random&features={j}"), image);
        match pearson(&heatmap(first), &heatmap(&r["features"][0])) {
            Some(c) => rs.push(c),
            // A feature the random model never moves: its map is flat, nothing like the trained one.
            None => flat += 1,
        }
    }
    let n = rs.len() + flat;
    let mean_abs = rs.iter().map(|r| r.abs()).sum::<f64>() / rs.len().max(1) as f64;
    let below = rs.iter().filter(|r| r.abs() < 0.5).count() + flat;
    eprintln!(
        "randomisation: {n} images, trained vs trained again r = {:.3} (min), trained vs random: mean |r| = {mean_abs:.3}, \
         |r| < 0.5 on {below}/{n} ({:.0}%), {flat} flat random maps",
        same.iter().copied().fold(f64::MAX, f64::min),
        100.0 * below as f64 / n as f64
    );
    assert!(n >= 40, "too few images with a discriminative feature: {n}");
    assert!(same.iter().all(|&r| r > 0.9999), "explanations are deterministic: {same:?}");
    assert!(mean_abs < 0.5, "randomised weights must change the maps: mean |r| {mean_abs}");
    assert!(below as f64 >= 0.75 * n as f64, "{below}/{n}");
    let _ = std::fs::remove_dir_all(&models);
}

/// Sanity check 2: occluding the hottest region lowers the feature more than occluding a random
/// region of the same size, measured outside the explanation code: the square is painted into
/// the PNG with the value that normalises to 0 (the mean, 0.286 x 255 = 73) and the image is
/// embedded with `/v1/embed`.
#[test]
fn occluding_the_hottest_region_lowers_the_feature_more_than_a_random_region() {
    let server = Server::start(&["--model", MODEL]);
    let mean_pixel = (0.286_f64 * 255.0).round() as u8;
    let embed = |img: &image::GrayImage| -> Vec<f64> {
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let r = server.post_image(&format!("/v1/embed?model={MODEL}"), "x.png", png);
        assert_eq!(r.status(), 200);
        common::floats(&r.json::<Value>().unwrap()["embedding"])
    };
    let paint = |img: &image::GrayImage, y: u32, x: u32, side: u32| {
        let mut out = img.clone();
        for yy in y..y + side {
            for xx in x..x + side {
                out.put_pixel(xx, yy, image::Luma([mean_pixel]));
            }
        }
        out
    };
    let mut seed = 0x2545_f491_u32;
    let (mut wins, mut pairs, mut hot_sum, mut random_sum) = (0, 0, 0.0, 0.0);
    for file in fmnist_fixtures(10) {
        let bytes = std::fs::read(&file).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_luma8();
        let v = explain(&server, &format!("model={MODEL}"), bytes);
        let patch = v["occlusion"]["patch"].as_u64().unwrap() as u32;
        let h0 = embed(&img);
        for f in v["features"].as_array().unwrap() {
            let j = f["index"].as_u64().unwrap() as usize;
            let hot = &f["hottest"];
            let centre = |k: &str, len: &str| hot[k].as_u64().unwrap() as u32 + hot[len].as_u64().unwrap() as u32 / 2;
            let at = |c: u32| c.saturating_sub(patch / 2).min(28 - patch);
            let hot_drop = h0[j] - embed(&paint(&img, at(centre("y", "height")), at(centre("x", "width")), patch))[j];
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let (ry, rx) = ((seed >> 8) % (29 - patch), (seed >> 20) % (29 - patch));
            let random_drop = h0[j] - embed(&paint(&img, ry, rx, patch))[j];
            pairs += 1;
            wins += usize::from(hot_drop > random_drop);
            hot_sum += hot_drop / h0[j];
            random_sum += random_drop / h0[j];
        }
    }
    let rate = wins as f64 / pairs as f64;
    eprintln!(
        "deletion: {pairs} (image, feature) pairs on 100 images: the hottest region lowers the feature more than a random one \
         on {wins} ({:.1}%); mean drop {:.1}% of the activation against {:.1}%",
        100.0 * rate,
        100.0 * hot_sum / pairs as f64,
        100.0 * random_sum / pairs as f64
    );
    assert!(pairs >= 100, "{pairs}");
    assert!(rate >= 0.8, "{wins}/{pairs}");
}

/// `qscore explain` on every bundled model: one overlay PNG per image and one JSON line each,
/// and exit 1 when a file failed, after trying every one. Two inputs with the same file name in
/// different folders get two overlays (`x.png`, `x-2.png`), never one overwriting the other.
#[test]
fn the_cli_writes_one_overlay_per_image_for_every_bundled_model() {
    let scratch = std::env::temp_dir().join(format!("qscore-explain-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let (a, b) = (scratch.join("a"), scratch.join("b"));
    for dir in [&a, &b] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let fixtures = fmnist_fixtures(1);
    std::fs::copy(&fixtures[0], a.join("x.png")).unwrap();
    std::fs::copy(&fixtures[1], b.join("x.png")).unwrap();
    std::fs::write(b.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let photo = root().join("tests/fixtures/photos/chelsea.png");

    let mut models: Vec<String> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("model.toml").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    models.sort();
    assert!(models.len() >= 9, "the eight Fashion-MNIST encoders and MobileNetV2: {models:?}");
    for model in &models {
        let out = scratch.join(format!("out-{model}"));
        let input = if model.starts_with("fmnist-") { a.join("x.png") } else { photo.clone() };
        let run = common::qscore_bin()
            .args(["explain", "--model", model, "--out", out.to_str().unwrap(), input.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(run.status.success(), "{model}: {}", String::from_utf8_lossy(&run.stderr));
        let line: Value = serde_json::from_slice(&run.stdout).unwrap();
        let overlay = PathBuf::from(line["overlay"].as_str().unwrap());
        let png = image::open(&overlay).unwrap_or_else(|e| panic!("{model}: {}: {e}", overlay.display()));
        assert!(png.width() > 0 && !line["explanation"]["features"].as_array().unwrap().is_empty(), "{model}: {line}");
    }

    let out = scratch.join("same-stem");
    let files = [a.join("x.png"), b.join("x.png"), b.join("broken.png")];
    let run = common::qscore_bin()
        .args(["explain", "--model", MODEL, "--out", out.to_str().unwrap()])
        .args(files.iter().map(|f| f.to_str().unwrap()))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "a failed file is exit 1: {}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<Value> =
        String::from_utf8(run.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "one line per file, the failed one included");
    let overlays: Vec<&str> = lines[..2].iter().map(|l| l["overlay"].as_str().unwrap()).collect();
    assert_eq!(overlays, [out.join("x.png").to_str().unwrap(), out.join("x-2.png").to_str().unwrap()]);
    assert_ne!(std::fs::read(overlays[0]).unwrap(), std::fs::read(overlays[1]).unwrap(), "two images, two overlays");
    assert!(lines[2]["error"]["code"].is_string(), "{}", lines[2]);

    // `--out` the images' own folder, which links to its parent and to itself: the input is never
    // replaced by its overlay, and the links to folders are not walked (no way out, no loop).
    let own = scratch.join("own");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::copy(&fixtures[0], own.join("x.png")).unwrap();
    std::os::unix::fs::symlink("..", own.join("up")).unwrap();
    std::os::unix::fs::symlink(".", own.join("self")).unwrap();
    let before = std::fs::read(own.join("x.png")).unwrap();
    let run = common::qscore_bin()
        .args(["explain", "--model", MODEL, "--out", own.to_str().unwrap(), own.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<Value> =
        String::from_utf8(run.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "x.png once: the links were not followed");
    assert_eq!(lines[0]["overlay"], own.join("x-2.png").to_str().unwrap());
    assert_eq!(std::fs::read(own.join("x.png")).unwrap(), before, "the input is untouched");
    std::fs::remove_dir_all(&scratch).unwrap();
}

/// `--max-concurrent-explains 1`: of several dear explanations sent at once, the ones past the
/// first are answered 429 `overloaded` at once (with Retry-After) instead of being admitted to
/// run out the deadline together; the one admitted finishes.
#[test]
fn explanations_past_the_concurrency_cap_are_429_at_once() {
    let server = Server::start(&["--model", MODEL, "--max-concurrent-explains", "1"]);
    let image = std::fs::read(&fmnist_fixtures(1)[0]).unwrap();
    // 784 passes each (patch 1, stride 1 on 28x28): long enough that four sent together overlap.
    let barrier = std::sync::Barrier::new(4);
    let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (server, image, barrier) = (&server, image.clone(), &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let r = server.post_image(&format!("/v1/explain?model={MODEL}&patch=1&stride=1"), "x.png", image);
                    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                    (r.status().as_u16(), retry, r.json().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = answers.iter().filter(|(s, ..)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, ..)| *s == 429).collect();
    assert!(ok >= 1 && !refused.is_empty() && ok + refused.len() == 4, "{answers:?}");
    for (_, retry, body) in refused {
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
        assert!(retry.is_some(), "429 carries Retry-After");
    }
    let again = server.post_image(&format!("/v1/explain?model={MODEL}"), "x.png", image);
    assert_eq!(again.status(), 200, "the place is free again once they ended");
}
