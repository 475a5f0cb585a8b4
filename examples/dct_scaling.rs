//! What `[preprocess] jpeg_dct_scaling` costs and saves, per photo: the time to turn the JPEG
//! into the model's tensor on the exact path and on the reduced (DCT-scaled) path, and how
//! close the two tensors' representations are (cosine, and the Q-Score with D = every feature).
//! Prints a Markdown table and a summary line. `make dct-scaling-bench` runs it on the large
//! photos `make photos` unpacks.
//!
//! cargo run --release --example dct_scaling -- MODEL_DIR PHOTO_DIR [REPEATS]

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ndarray::{Array1, Axis};
use qscore::{
    image::ImageLimits,
    model::{
        encoder::{Encoder, SessionOptions},
        manifest::{Manifest, Preprocess},
        runtime,
    },
    qscore::{Discriminative, score},
};

/// The median times of `repeats` calls of `a` and of `b`, after one warm-up call each, the
/// calls interleaved so that both see the same machine (this one is shared and noisy).
fn median_times(repeats: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration) {
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    a();
    b();
    let (mut ta, mut tb): (Vec<Duration>, Vec<Duration>) = (0..repeats).map(|_| (timed(&mut a), timed(&mut b))).unzip();
    ta.sort();
    tb.sort();
    (ta[repeats / 2], tb[repeats / 2])
}

fn cosine(a: &Array1<f32>, b: &Array1<f32>) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &Array1<f32>| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model_dir), Some(photo_dir)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: dct_scaling MODEL_DIR PHOTO_DIR [REPEATS]");
    };
    let repeats: usize = args.get(3).map_or(Ok(7), |s| s.parse())?;
    let dir = Path::new(model_dir);
    let manifest = Manifest::load(dir)?;
    let exact = Preprocess { jpeg_dct_scaling: false, ..manifest.preprocess() };
    let reduced = Preprocess { jpeg_dct_scaling: true, ..manifest.preprocess() };
    let env = runtime::start(&runtime::locate(None)?)?;
    let opts = SessionOptions { intra_spinning: true, ..SessionOptions::default() };
    let mut encoder = Encoder::load_folder(&env, dir, &manifest, opts)?;
    let all = Discriminative::from_indices(&(0..manifest.output.dim).collect::<Vec<_>>(), manifest.output.dim)
        .map_err(|i| anyhow::anyhow!("feature {i} out of range"))?;
    let eps = manifest.qscore.epsilon;
    let limits = ImageLimits { max_bytes: 64 << 20, max_pixels: 100_000_000, ..ImageLimits::DEFAULT };

    let mut photos: Vec<PathBuf> = std::fs::read_dir(photo_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg")))
        .collect();
    photos.sort();
    anyhow::ensure!(!photos.is_empty(), "no .jpg files in {photo_dir}");

    println!("model {} ({}x{} input), {} repeats per path\n", manifest.name, exact.width, exact.height, repeats);
    println!(
        "| photo | size | path taken | exact ms | with the option ms | speed-up | cosine | Q exact | Q with the option |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    let (mut cosines, mut speedups, mut q_diffs, mut untaken) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for path in &photos {
        let bytes = std::fs::read(path)?;
        let header = qscore::image::inspect(&bytes, &limits)?;
        let (t_exact, t_reduced) = median_times(
            repeats,
            || drop(qscore::image::prepare(&bytes, &limits, &exact)),
            || drop(qscore::image::prepare(&bytes, &limits, &reduced)),
        );
        let taken =
            qscore::image::prepare(&bytes, &limits, &exact)? != qscore::image::prepare(&bytes, &limits, &reduced)?;
        let mut embed = |p: &Preprocess| -> anyhow::Result<Array1<f32>> {
            let x = qscore::image::prepare(&bytes, &limits, p)?;
            Ok(encoder.embed(x.insert_axis(Axis(0)).view())?.embeddings.row(0).to_owned())
        };
        let (h_exact, h_reduced) = (embed(&exact)?, embed(&reduced)?);
        let c = cosine(&h_exact, &h_reduced);
        let q = |h: &Array1<f32>| score(h.view(), eps, &all).map(|s| s.q_score);
        let (q_exact, q_reduced) = (q(&h_exact)?, q(&h_reduced)?);
        let speedup = t_exact.as_secs_f64() / t_reduced.as_secs_f64();
        println!(
            "| {} | {}x{} | {} | {:.2} | {:.2} | {:.2}x | {:.4} | {:.3} | {:.3} |",
            path.file_name().unwrap_or_default().to_string_lossy(),
            header.width,
            header.height,
            if taken { "reduced" } else { "exact (progressive, or too small)" },
            t_exact.as_secs_f64() * 1e3,
            t_reduced.as_secs_f64() * 1e3,
            speedup,
            c,
            q_exact,
            q_reduced
        );
        if taken {
            cosines.push(c);
            speedups.push(speedup);
            q_diffs.push(f64::from((q_exact - q_reduced).abs()));
        } else {
            untaken.push(speedup);
        }
    }
    anyhow::ensure!(!speedups.is_empty(), "no photo in {photo_dir} took the reduced path");
    speedups.sort_by(f64::total_cmp);
    untaken.sort_by(f64::total_cmp);
    println!(
        "\n{} of {} photos took the reduced path: cosine mean {:.4}, min {:.4}; median speed-up {:.2}x \
         (min {:.2}x, max {:.2}x); mean |Q exact - Q reduced| {:.3}. The {} on the exact path (the same work \
         timed twice: the noise floor) read {}",
        speedups.len(),
        photos.len(),
        cosines.iter().sum::<f64>() / cosines.len() as f64,
        cosines.iter().copied().fold(f64::INFINITY, f64::min),
        speedups[speedups.len() / 2],
        speedups[0],
        speedups[speedups.len() - 1],
        q_diffs.iter().sum::<f64>() / q_diffs.len() as f64,
        untaken.len(),
        if untaken.is_empty() {
            "nothing".to_owned()
        } else {
            format!("{:.2}x to {:.2}x", untaken[0], untaken[untaken.len() - 1])
        },
    );
    Ok(())
}
