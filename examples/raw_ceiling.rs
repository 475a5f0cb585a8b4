//! The raw ceiling of the load benchmark: the ONNX Runtime session alone, on tensors prepared
//! in advance, and the single-image path (decode + preprocess + one run) that bounds latency at
//! concurrency 1. Prints one JSON object for `benches/load/run.sh`.
//!
//! cargo run --release --example raw_ceiling -- PHOTO.jpg [SECONDS] [MODEL_DIR]

use std::time::{Duration, Instant};

use ndarray::{Array4, Axis};
use qscore::{
    image::ImageLimits,
    model::{
        encoder::{Encoder, SessionOptions},
        manifest::Manifest,
        runtime,
    },
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let photo = std::fs::read(args.get(1).map_or("tests/fixtures/photos/china.jpg", String::as_str))?;
    let seconds: f64 = args.get(2).map_or(Ok(5.0), |s| s.parse())?;
    let dir = std::path::Path::new(args.get(3).map_or("models/mobilenet_v2-imagenet", String::as_str));
    let manifest = Manifest::load(dir)?;
    let pre = manifest.preprocess();
    let env = runtime::start(&runtime::locate(None)?)?;
    let opts = SessionOptions { intra_spinning: true, ..SessionOptions::default() };
    let mut encoder = Encoder::load_folder(&env, dir, &manifest, opts)?;
    let limits = ImageLimits::DEFAULT;
    let tensor = qscore::image::prepare(&photo, &limits, &pre)?;

    let mut out = serde_json::Map::new();
    for n in [1_usize, 32] {
        let mut batch = Array4::<f32>::zeros((n, tensor.dim().0, tensor.dim().1, tensor.dim().2));
        batch.axis_iter_mut(Axis(0)).for_each(|mut s| s.assign(&tensor));
        encoder.embed(batch.view())?;
        let (start, mut images) = (Instant::now(), 0);
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            encoder.embed(batch.view())?;
            images += n;
        }
        out.insert(format!("raw_batch_{n}_images_per_s"), (images as f64 / start.elapsed().as_secs_f64()).into());
    }

    // Decode + preprocess + one batch-1 run, per image: the floor of a request's latency.
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        let t = Instant::now();
        let x = qscore::image::prepare(&photo, &limits, &pre)?;
        encoder.embed(x.insert_axis(Axis(0)).view())?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    out.insert("single_image_images_per_s".into(), (lat.len() as f64 / start.elapsed().as_secs_f64()).into());
    out.insert("single_image_p50_ms".into(), q(0.5).into());
    out.insert("single_image_p99_ms".into(), q(0.99).into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
