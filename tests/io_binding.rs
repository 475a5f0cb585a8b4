//! The IO-binding path that `--device cuda` takes, run on the CPU execution provider: the same
//! staging buffer, binding, output binding and read-back code, with host memory where CUDA has
//! pinned memory. It must answer exactly what `session.run` answers, whatever the batch sizes
//! (the staging buffer grows and is reused), for a plain encoder and one with a classifier head.
//! What only a GPU shows (pinned memory, the upload) is measured by `benches/gpu/run.sh`.

mod common;

use std::path::Path;

use common::root;
use ndarray::{Array3, Array4, ArrayView3, Axis, s};
use qscore::model::{
    encoder::{Encoded, Encoder, IoPath, SessionOptions},
    manifest::Manifest,
    runtime,
};

/// `n` different images of the model's input shape (a smooth pattern per image).
fn images(manifest: &Manifest, n: usize) -> Vec<Array3<f32>> {
    let (c, h, w) = (manifest.input.channels, manifest.input.height as usize, manifest.input.width as usize);
    (0..n)
        .map(|i| {
            Array3::from_shape_fn((c, h, w), |(k, y, x)| {
                ((i as f32 + 1.0) * 0.37 * (y as f32 * 0.11 + k as f32).sin() + (x as f32 * 0.07).cos()) * 0.8
            })
        })
        .collect()
}

fn stack(images: &[Array3<f32>]) -> Array4<f32> {
    let views: Vec<ArrayView3<f32>> = images.iter().map(|a| a.view()).collect();
    ndarray::stack(Axis(0), &views).unwrap()
}

fn load(env: &ort::environment::Environment, dir: &Path, io: IoPath) -> (Encoder, Manifest) {
    let manifest = Manifest::load(dir).unwrap();
    let head = manifest.classifier.as_ref().map(|c| (c.output.as_str(), c.classes.len()));
    let opts = SessionOptions { io: Some(io), ..SessionOptions::default() };
    let io_names = (manifest.input.name.as_str(), manifest.output.name.as_str(), manifest.output.dim);
    let encoder = Encoder::load(env, &dir.join("model.onnx"), io_names, head, opts).unwrap();
    (encoder, manifest)
}

fn assert_close(a: &Encoded, b: &Encoded, what: &str) {
    let close = |x: &ndarray::Array2<f32>, y: &ndarray::Array2<f32>| {
        x.dim() == y.dim() && x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + p.abs()))
    };
    assert!(close(&a.embeddings, &b.embeddings), "{what}: the embeddings differ");
    match (&a.logits, &b.logits) {
        (Some(x), Some(y)) => assert!(close(x, y), "{what}: the logits differ"),
        (None, None) => {}
        _ => panic!("{what}: one path answered logits and the other not"),
    }
}

/// Both paths over one model: batches that grow the staging buffer, shrink, and grow again.
fn both_paths_agree(env: &ort::environment::Environment, dir: &Path) {
    let (mut run, manifest) = load(env, dir, IoPath::Run);
    let (mut bound, _) = load(env, dir, IoPath::Bind);
    assert_eq!(run.io_description(), "session.run, host tensors");
    assert_eq!(
        bound.io_description(),
        "IO binding: input from a host staging buffer, outputs to host memory",
        "{}",
        dir.display()
    );
    let all = images(&manifest, 9);
    let whole = run.embed(stack(&all).view()).unwrap();
    for n in [1, 3, 2, 9, 5] {
        let part = &all[..n];
        let expected = Encoded {
            embeddings: whole.embeddings.slice(s![..n, ..]).to_owned(),
            logits: whole.logits.as_ref().map(|l| l.slice(s![..n, ..]).to_owned()),
        };
        let batch = stack(part);
        assert_close(&bound.embed(batch.view()).unwrap(), &expected, &format!("{}: bound embed of {n}", dir.display()));
        let views: Vec<ArrayView3<f32>> = part.iter().map(|a| a.view()).collect();
        let what = format!("{}: bound embed_images of {n}", dir.display());
        assert_close(&bound.embed_images(&views).unwrap(), &expected, &what);
        assert_close(&run.embed_images(&views).unwrap(), &expected, &format!("{}: run of {n}", dir.display()));
    }
    // A wrong image shape is an error, not a garbled batch.
    let (c, h, w) = all[0].dim();
    let wrong = Array3::<f32>::zeros((c, h + 1, w));
    let err = bound.embed_images(&[all[0].view(), wrong.view()]).unwrap_err();
    assert!(format!("{err:#}").contains("the model takes"), "{err:#}");
}

#[test]
fn io_binding_answers_what_session_run_answers() {
    let env = runtime::start(&runtime::locate(None).expect("run `make ort`")).unwrap();
    both_paths_agree(&env, &root().join("models/mobilenet_v2-imagenet"));
    both_paths_agree(&env, &root().join("models/fmnist-simclr"));

    // With a classifier head: its logits are bound and read back the same way.
    let dir = std::env::temp_dir().join(format!("qscore-io-binding-{}", std::process::id()));
    let head = dir.join("fmnist-simclr-head");
    let made = std::process::Command::new(root().join(".venv-test/bin/python"))
        .arg(root().join("models/recipes/add_classifier_head.py"))
        .args(["--model", root().join("models/fmnist-simclr").to_str().unwrap(), "--out", head.to_str().unwrap()])
        .output()
        .expect("run `make tools` for .venv-test");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    both_paths_agree(&env, &head);
    std::fs::remove_dir_all(dir).unwrap();
}
