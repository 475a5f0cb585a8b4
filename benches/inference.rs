//! Where the time goes, from the raw ONNX Runtime ceiling to a full HTTP request, in one run
//! so that every figure has its baseline beside it.
//!
//! - `ort_raw`: the encoder's session alone on prepared tensors (batch 1 and 32): the ceiling.
//! - `pipeline`: decode + resize + normalise + inference + Q-Score through the same `Engine`
//!   as the server and `qscore score` (1 image, 32 images).
//! - `http`: a real server on a loopback port: `POST /v1/score` (1 image) and
//!   `POST /v1/score/batch` (32 images), with a keep-alive client.
//! - `qscore_math`: section 1 over a 256 x 1280 batch.
//! - `preprocess`: decode + resize + normalise of a 224 x 224 and a 1920 x 1080 JPEG.
//!
//! Run with `make bench` (needs `make ort`). Criterion reports elements/s as images/s.

use std::{hint::black_box, io::Cursor, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ndarray::{Array2, Array4, Axis};
use qscore::{
    engine::{BatchSettings, Capacity, EmbeddingMode, Engine, EngineConfig, Input, Selection},
    http::{AppState, RequestLimits},
    image::ImageLimits,
    model::encoder::{Encoder, SessionOptions},
    qscore::Discriminative,
};

const PHOTOS: [&str; 6] = ["astronaut.png", "chelsea.png", "china.jpg", "coffee.png", "flower.jpg", "rocket.jpg"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn engine() -> EngineConfig {
    EngineConfig {
        models_dir: root().join("models"),
        default_model: Some("mobilenet_v2-imagenet".into()),
        ort_lib: None,
        session: SessionOptions::default(),
        batching: BatchSettings { max_batch: 32, max_delay: Duration::from_millis(2) },
        limits: ImageLimits::DEFAULT,
    }
}

/// 32 real photos as JPEG bytes (the six fixtures, re-encoded where they are PNG, cycled).
fn jpegs(n: usize) -> Vec<Bytes> {
    let encoded: Vec<Bytes> = PHOTOS
        .iter()
        .map(|p| {
            let img = image::open(root().join("tests/fixtures/photos").join(p)).expect("fixture photo");
            let mut buf = Vec::new();
            img.to_rgb8().write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Jpeg).unwrap();
            Bytes::from(buf)
        })
        .collect();
    encoded.iter().cycle().take(n).cloned().collect()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let scorer = Arc::new(Engine::open(&engine(), &Selection::All, Capacity::OFFLINE).expect("run `make ort` first"));
    let model = scorer.registry().get(None).unwrap();
    let photos = jpegs(32);
    let limits = ImageLimits::DEFAULT;
    let tensors: Vec<_> =
        photos.iter().map(|b| qscore::image::prepare(b, &limits, &model.preprocess).unwrap()).collect();

    // (a) The raw ceiling: a second session of the same model, fed prepared tensors.
    let mut encoder = Encoder::load(
        scorer.environment().expect("an ONNX Runtime engine"),
        &root().join("models/mobilenet_v2-imagenet/model.onnx"),
        ("pixel_values", "embedding", 1280),
        None,
        SessionOptions { intra_spinning: true, ..SessionOptions::default() },
    )
    .unwrap();
    let mut raw = c.benchmark_group("ort_raw");
    for n in [1_usize, 32] {
        let mut batch = Array4::<f32>::zeros((n, 3, 224, 224));
        for (mut slot, t) in batch.axis_iter_mut(Axis(0)).zip(tensors.iter().cycle()) {
            slot.assign(t);
        }
        raw.throughput(Throughput::Elements(n as u64));
        raw.bench_function(format!("batch_{n}"), |b| b.iter(|| black_box(encoder.embed(batch.view()).unwrap())));
    }
    raw.finish();
    drop(encoder);

    // (b) The full pipeline without HTTP.
    let mut pipe = c.benchmark_group("pipeline");
    for n in [1_usize, 32] {
        let images: Vec<Bytes> = photos[..n].to_vec();
        pipe.throughput(Throughput::Elements(n as u64));
        pipe.bench_function(format!("images_{n}"), |b| {
            b.iter(|| {
                let inputs = images.iter().map(|b| Input::new(String::new(), Ok(b.clone()))).collect();
                let out = rt.block_on(scorer.score(&model, inputs, EmbeddingMode::Omit)).unwrap();
                assert!(out.iter().all(|o| o.answer.is_ok()));
                black_box(out)
            })
        });
    }
    pipe.finish();

    // (c) Real HTTP on loopback.
    let state = AppState {
        engine: Arc::clone(&scorer),
        limits: RequestLimits {
            max_body_bytes: 64 << 20,
            max_batch_images: 256,
            body_timeout: std::time::Duration::from_secs(60),
        },
        api_keys: None,
        label_studio: None,
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, qscore::http::router(state, &[])).await });
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let mut http = c.benchmark_group("http");
    http.throughput(Throughput::Elements(1));
    let one = photos[2].clone();
    http.bench_function("score_1", |b| {
        b.iter(|| {
            let r = client
                .post(format!("{url}/v1/score"))
                .header("content-type", "image/jpeg")
                .body(one.clone())
                .send()
                .unwrap();
            assert!(r.status().is_success());
            black_box(r.bytes().unwrap())
        })
    });
    http.throughput(Throughput::Elements(32));
    http.bench_function("batch_32", |b| {
        b.iter(|| {
            let mut form = reqwest::blocking::multipart::Form::new();
            for (i, p) in photos.iter().enumerate() {
                form = form
                    .part("image", reqwest::blocking::multipart::Part::bytes(p.to_vec()).file_name(format!("{i}.jpg")));
            }
            let r = client.post(format!("{url}/v1/score/batch")).multipart(form).send().unwrap();
            assert!(r.status().is_success());
            black_box(r.bytes().unwrap())
        })
    });
    http.finish();

    // (d) The maths alone.
    let reps = Array2::from_shape_fn((256, 1280), |(i, j)| ((i * 7919 + j * 104_729) % 1000) as f32 / 250.0);
    let mut math = c.benchmark_group("qscore_math");
    math.throughput(Throughput::Elements(256));
    math.bench_function("256x1280", |b| {
        b.iter(|| black_box(qscore::qscore::score_batch(reps.view(), 4.0, &Discriminative::All)))
    });
    math.finish();

    // (e) Decode + resize + normalise.
    let big = {
        let img = image::open(root().join("tests/fixtures/photos/astronaut.png")).unwrap();
        let img = img.resize_exact(1920, 1080, image::imageops::FilterType::Triangle);
        let mut buf = Vec::new();
        img.to_rgb8().write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Jpeg).unwrap();
        buf
    };
    let small = {
        let img = image::open(root().join("tests/fixtures/photos/astronaut.png")).unwrap().resize_exact(
            224,
            224,
            image::imageops::FilterType::Triangle,
        );
        let mut buf = Vec::new();
        img.to_rgb8().write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Jpeg).unwrap();
        buf
    };
    let mut pre = c.benchmark_group("preprocess");
    pre.throughput(Throughput::Elements(1));
    pre.bench_function("jpeg_224", |b| {
        b.iter(|| black_box(qscore::image::prepare(&small, &limits, &model.preprocess).unwrap()))
    });
    pre.bench_function("jpeg_1080p", |b| {
        b.iter(|| black_box(qscore::image::prepare(&big, &limits, &model.preprocess).unwrap()))
    });
    pre.finish();
}

criterion_group! {
    name = inference;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(inference);
