//! `qscore calibrate` and `qscore evaluate`: turn the Q-Score into a decision a user can trust,
//! and say what it is worth.
//!
//! The paper's claim is that the Q-Score predicts a linear probe's mistakes. That is measured
//! here, not assumed: calibration embeds a labelled ImageFolder through the server's own
//! pipeline, fits D and a probe on one part, and scores every risk estimator (the Q-Score
//! among them) on held-out images. The estimator with the best held-out AUPRC drives the flag,
//! unless the user forces one, and every estimator's figures are written down next to it, so
//! whoever reads `GET /v1/models/{name}` sees how much the flag is worth.

pub mod dataset;
pub mod export;
pub mod fit;
pub mod predictions;
pub mod report;

use std::{io::IsTerminal, path::Path};

use anyhow::{Context, bail};
use bytes::Bytes;
use ndarray::Array2;

use self::{
    dataset::{Dataset, Part, Split},
    fit::{Embedded, Settings},
};
use crate::{
    config::{CalibrateArgs, EvaluateArgs, ReportFormat},
    engine::{Capacity, EmbeddingMode, Engine, Input, Model, Selection},
    model::{
        calibration::{Calibration, DataFingerprint, Target},
        manifest::Manifest,
    },
    risk::probe::ProbeSettings,
};

/// Images per call into the pipeline: large enough to keep the worker busy, small enough to
/// keep memory flat on big folders.
const CHUNK: usize = 256;

/// Runs `qscore calibrate`: writes the calibration file and prints the model's tables.
pub async fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let name = args.engine.model.clone().context("--model is required: it names the model to calibrate")?;
    let split = Split { fit_fraction: args.fit_fraction, select_fraction: args.select_fraction, seed: args.seed };
    let (dataset, sources) = match (&args.data, &args.fit, &args.holdout) {
        (Some(data), _, _) => (Dataset::from_folder(data, split)?, vec![data.clone()]),
        (None, Some(fit), Some(holdout)) => {
            (Dataset::from_folders(fit, holdout, split)?, vec![fit.clone(), holdout.clone()])
        }
        _ => bail!("give --data DIR, or --fit DIR and --holdout DIR"),
    };

    let (config, selection) = (args.engine.config()?, Selection::Uncalibrated(name.clone()));
    let engine = tokio::task::spawn_blocking(move || Engine::open(&config, &selection, Capacity::OFFLINE)).await??;
    let model = engine.registry().get(Some(&name))?;
    let defaults = model.manifest.qscore;

    let head = model.manifest.classifier.clone();
    let user = match (&args.predictions, &head) {
        (Some(_), Some(spec)) => bail!(
            "model {name} has its own classifier head (`{}` in model.toml), and its mistakes are the ones calibration \
             predicts; drop --predictions, or remove [classifier] from model.toml to calibrate for another classifier",
            spec.output
        ),
        (Some(file), None) => Some(predictions::read(file, &dataset)?),
        (None, Some(spec)) => {
            if let Some(c) = spec.classes.iter().find(|c| !dataset.classes.contains(c)) {
                bail!(
                    "model.toml's classifier.classes has `{c}`, which is no class folder of the data ({}); \
                     the head's classes must be the folders' names",
                    dataset.classes.join(", ")
                );
            }
            None
        }
        (None, None) => None,
    };

    let Embeddings { h, kept, mut skipped, head_predictions } = embed(&engine, &model, &dataset).await?;
    skipped.extend(dataset.ignored.iter().map(|p| format!("{}: not an image file by its extension", p.display())));
    for s in &skipped {
        tracing::warn!("left out: {s}");
    }
    let labels: Vec<usize> = kept.iter().map(|&i| dataset.images[i].class).collect();
    let parts: Vec<Part> = kept.iter().map(|&i| dataset.images[i].part).collect();
    let (predicted, confidence, target) = match (&user, &head) {
        (Some(u), _) => (
            Some(kept.iter().map(|&i| u.predicted[i]).collect::<Vec<_>>()),
            u.confidence.as_ref().map(|c| kept.iter().map(|&i| c[i]).collect::<Vec<_>>()),
            Target::Predictions {
                file: args.predictions.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                sha256: u.sha256.clone(),
                with_confidence: u.confidence.is_some(),
            },
        ),
        (None, Some(spec)) => {
            let (classes, confidences): (Vec<usize>, Vec<f32>) = head_predictions
                .iter()
                .map(|(class, p)| {
                    let c = dataset.classes.iter().position(|d| d == class).expect("head classes are folders");
                    (c, *p)
                })
                .unzip();
            let target = Target::ModelHead { output: spec.output.clone(), classes: spec.classes.clone() };
            (Some(classes), Some(confidences), target)
        }
        (None, None) => (None, None, Target::Probe),
    };

    let (epsilon, percentiles) =
        (args.epsilon.unwrap_or(defaults.epsilon), args.percentiles.unwrap_or(defaults.percentiles));
    let settings = Settings {
        epsilon,
        percentiles,
        risk_source: args.risk_source,
        target_precision: args.target_precision,
        k: args.neighbours,
        max_neighbours: args.max_neighbours,
        probe: ProbeSettings { alpha: args.probe_alpha, max_iterations: args.probe_max_iterations },
        random_subsets: args.random_subsets,
        curve_fractions: args.compression_curve.clone(),
        isotonic_prior: args.isotonic_prior,
        seed: args.seed,
        sweep: sweep_grid(&args, epsilon, percentiles),
    };
    let fingerprint = DataFingerprint {
        sources: sources.iter().map(|p| p.display().to_string()).collect(),
        classes: dataset.classes.clone(),
        fit_per_class: dataset.per_class(Part::Fit, &kept),
        select_per_class: dataset.per_class(Part::Select, &kept),
        test_per_class: dataset.per_class(Part::Test, &kept),
        file_list_sha256: dataset.fingerprint(),
        skipped,
    };
    let classes = dataset.classes.clone();
    let model_name = name.clone();
    tracing::info!(images = labels.len(), "fitting D, the probe and the estimators");
    tracing::info!(%target, "misclassified means the mistakes of {target}");
    let export_dir = args.export_split.clone();
    let mut calibration = tokio::task::spawn_blocking(move || {
        let data = Embedded {
            h: h.view(),
            labels: &labels,
            parts: &parts,
            classes: &classes,
            predicted: predicted.as_deref(),
            confidence: confidence.as_deref(),
        };
        let calibration = fit::calibrate(&data, &settings, &model_name, fingerprint)?;
        if let Some(dir) = export_dir {
            export::write(&dir, &data, &calibration)?;
            tracing::info!(dir = %dir.display(), "split exported");
        }
        anyhow::Ok(calibration)
    })
    .await??;
    calibration.target = target;

    let out = args.out.clone().unwrap_or_else(|| args.engine.models_dir.join(&name).join("calibration.json"));
    crate::atomic_file::write_atomically(&out, &serde_json::to_string_pretty(&calibration)?)?;
    tracing::info!(path = %out.display(), risk_source = %calibration.risk_source, "calibration written");
    println!("{}", report::markdown(&[&calibration]));
    Ok(())
}

/// The (eps, band) grid of `--sweep-epsilon` x `--sweep-percentiles`; either alone is crossed
/// with the calibration's own other value.
fn sweep_grid(args: &CalibrateArgs, epsilon: f32, band: (f64, f64)) -> Vec<(f32, (f64, f64))> {
    if args.sweep_epsilon.is_empty() && args.sweep_percentiles.is_empty() {
        return Vec::new();
    }
    let eps = if args.sweep_epsilon.is_empty() { vec![epsilon] } else { args.sweep_epsilon.clone() };
    let bands = if args.sweep_percentiles.is_empty() { vec![band] } else { args.sweep_percentiles.clone() };
    eps.iter().flat_map(|&e| bands.iter().map(move |&b| (e, b))).collect()
}

/// What embedding a dataset gives: the representations of the images that scored, their
/// indices in `dataset.images`, one line per image that did not, and, for a model with a
/// classifier head, the head's class name and probability per kept image.
struct Embeddings {
    h: Array2<f32>,
    kept: Vec<usize>,
    skipped: Vec<String>,
    head_predictions: Vec<(String, f32)>,
}

/// Embeds every image through the server's pipeline.
async fn embed(engine: &Engine, model: &std::sync::Arc<Model>, dataset: &Dataset) -> anyhow::Result<Embeddings> {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(dataset.images.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
                .expect("a valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message(format!("embedding with {}", model.name()));
    let dim = model.manifest.output.dim;
    let has_head = model.manifest.classifier.is_some();
    let (mut rows, mut kept, mut skipped, mut head_predictions) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let indices: Vec<usize> = (0..dataset.images.len()).collect();
    for chunk in indices.chunks(CHUNK) {
        let inputs = chunk
            .iter()
            .map(|&i| {
                let path = &dataset.images[i].path;
                let bytes = std::fs::read(path)
                    .map(Bytes::from)
                    .map_err(|e| crate::error::Error::UnreadableFile(e.to_string()));
                Input::new(i.to_string(), bytes)
            })
            .collect();
        let answers = engine.score(model, inputs, EmbeddingMode::Full).await?;
        for (&i, out) in chunk.iter().zip(answers) {
            let path = dataset.images[i].path.display();
            match out.answer {
                Ok(a) => match (a.embedding, a.predicted_class, a.class_probability) {
                    (Some(h), class, p) if h.len() == dim && (!has_head || class.is_some()) => {
                        rows.extend(h);
                        kept.push(i);
                        if let (true, Some(class), Some(p)) = (has_head, class, p) {
                            head_predictions.push((class, p));
                        }
                    }
                    _ => skipped.push(format!("{path}: no embedding came back")),
                },
                // A failed run is the model's fault, not this image's: stop instead of
                // calibrating on whatever batches happened to work.
                Err(e @ crate::error::Error::Internal(_)) => bail!("{path}: {e}; calibration stopped"),
                Err(e) => skipped.push(format!("{path}: {e}")),
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let h = Array2::from_shape_vec((kept.len(), dim), rows)?;
    Ok(Embeddings { h, kept, skipped, head_predictions })
}

/// Runs `qscore evaluate`: prints the stored evaluation of calibrated models.
pub fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let names = if args.model.is_empty() {
        let mut found: Vec<String> = std::fs::read_dir(&args.models_dir)
            .with_context(|| format!("cannot read {}", args.models_dir.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.path().join("calibration.json").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        found.sort();
        found
    } else {
        args.model.clone()
    };
    if names.is_empty() {
        bail!("no calibrated model under {}; run `qscore calibrate` first", args.models_dir.display());
    }
    let cals = names.iter().map(|n| load(&args.models_dir.join(n))).collect::<anyhow::Result<Vec<_>>>()?;
    match args.format {
        ReportFormat::Markdown => println!("{}", report::markdown(&cals.iter().collect::<Vec<_>>())),
        ReportFormat::Json => {
            let v: Vec<_> = cals
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "model": c.model, "target": c.target, "epsilon": c.epsilon, "percentiles": c.percentiles,
                        "risk_source": c.risk_source, "threshold": c.threshold, "threshold_rule": c.threshold_rule,
                        "discriminative_features": c.discriminative_features, "evaluation": c.evaluation, "data": c.data,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

fn load(dir: &Path) -> anyhow::Result<Calibration> {
    let manifest = Manifest::load(dir)?;
    Calibration::load(dir, manifest.output.dim)?.with_context(|| {
        format!("{} has no calibration.json; run `qscore calibrate --model {}`", dir.display(), manifest.name)
    })
}
