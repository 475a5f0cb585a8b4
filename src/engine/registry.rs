//! The models loaded at start-up, each with its own inference worker: what a model folder holds
//! at rest ([`crate::model`]) joined to the thread that runs it.
//!
//! Start-up order, as TEI does it: load every model, check its manifest against the graph, run
//! one warm-up batch, and only then hand the registry to the server. A model that fails any
//! step stops start-up with a message naming the folder.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{Context, bail};
use ndarray::Array4;
use ort::environment::Environment;

use super::{
    EngineConfig,
    batch::{BatchSettings, Worker},
};
use crate::{
    error::Error,
    metrics::Metrics,
    model::{
        calibration::Calibration,
        encoder::{Device, Encoder, SessionOptions},
        manifest::{Manifest, Preprocess, QScoreParams},
        runtime,
    },
    qscore::Discriminative,
};

/// One loaded model.
pub struct Model {
    /// Its manifest.
    pub manifest: Manifest,
    /// The image path's settings, derived from the manifest once.
    pub preprocess: Preprocess,
    /// Its calibration, when `calibration.json` is present.
    pub calibration: Option<Calibration>,
    /// D: every feature when uncalibrated, calibration's set otherwise.
    pub discriminative: Discriminative,
    /// The Q-Score parameters in force: calibration's when calibrated (D was found with them),
    /// else the manifest's.
    pub qscore: QScoreParams,
    /// Where inference runs.
    pub device: Device,
    /// Handle to its inference thread.
    pub worker: Worker,
}

impl Model {
    /// Joins what a model folder holds to the worker that runs it, with the Q-Score parameters
    /// and D in force (the calibration's when there is one). Fails when the calibration does not
    /// fit the manifest's dimension.
    pub fn new(
        manifest: Manifest,
        calibration: Option<Calibration>,
        device: Device,
        worker: Worker,
    ) -> Result<Self, String> {
        let dim = manifest.output.dim;
        if let Some(c) = &calibration {
            c.check_head(manifest.classifier.as_ref())?;
        }
        let discriminative = match &calibration {
            Some(c) => c.discriminative_set(dim)?,
            None => Discriminative::All,
        };
        let qscore = calibration
            .as_ref()
            .map_or(manifest.qscore, |c| QScoreParams { epsilon: c.epsilon, percentiles: c.percentiles });
        Ok(Self { preprocess: manifest.preprocess(), manifest, calibration, discriminative, qscore, device, worker })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }
}

/// Which models to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every model folder, each with its calibration when it has one: what the server runs.
    All,
    /// One model without its calibration: what `qscore calibrate` embeds with, so that a stale
    /// or broken calibration.json never stands in the way of writing a new one.
    Uncalibrated(String),
}

/// Every loaded model, by name.
pub struct Registry {
    models: BTreeMap<String, Arc<Model>>,
    default: String,
    // Sessions borrow the process-wide environment; it lives as long as the registry. None for
    // models that run no ONNX Runtime session (tests' fake encoders).
    env: Option<Environment>,
}

impl Registry {
    /// Loads, checks and warms up the selected model folders under `config.models_dir`.
    pub fn load(config: &EngineConfig, selection: &Selection, metrics: &Metrics) -> anyhow::Result<Self> {
        let lib = runtime::locate(config.ort_lib.as_deref())?;
        let env = runtime::start(&lib)?;
        tracing::info!(library = %lib.display(), "ONNX Runtime loaded");
        let (opts, batching) = (config.session, config.batching);

        let mut dirs = model_dirs(&config.models_dir)?;
        if let Selection::Uncalibrated(name) = selection {
            let all: Vec<String> = dirs.iter().filter_map(|d| d.file_name()?.to_str().map(str::to_owned)).collect();
            dirs.retain(|d| d.file_name().is_some_and(|n| n == name.as_str()));
            if dirs.is_empty() {
                bail!("no model `{name}` under {}; found: {}", config.models_dir.display(), all.join(", "));
            }
        }
        let with_calibration = *selection == Selection::All;
        let mut models = BTreeMap::new();
        for dir in dirs {
            let model = load_model(&env, &dir, opts, with_calibration, batching, metrics)?;
            metrics
                .model_info
                .with_label_values(&[model.name(), &model.manifest.version, &opts.device.to_string()])
                .set(1);
            tracing::info!(model = model.name(), device = %opts.device, calibrated = model.calibration.is_some(), "model ready");
            models.insert(model.manifest.name.clone(), Arc::new(model));
        }
        let Some(first) = models.keys().next().cloned() else {
            bail!(
                "no model found under {}: each model is a folder with model.onnx and model.toml",
                config.models_dir.display()
            );
        };
        let default = match &config.default_model {
            Some(name) if !models.contains_key(name) => {
                bail!(
                    "--model {name} is not among the loaded models: {}",
                    models.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }
            Some(name) => name.clone(),
            None => first,
        };
        Ok(Self { models, default, env: Some(env) })
    }

    /// A registry of models built elsewhere (in-process tests with a fake encoder); the first
    /// is the default.
    pub fn from_models(models: Vec<Model>) -> anyhow::Result<Self> {
        let default = models.first().map(|m| m.name().to_owned()).context("a registry needs a model")?;
        let models = models.into_iter().map(|m| (m.name().to_owned(), Arc::new(m))).collect();
        Ok(Self { models, default, env: None })
    }

    /// The model called `name`, or the default one.
    pub fn get(&self, name: Option<&str>) -> Result<&Arc<Model>, Error> {
        let name = name.unwrap_or(&self.default);
        self.models
            .get(name)
            .ok_or_else(|| Error::UnknownModel { name: name.to_owned(), loaded: self.names().join(", ") })
    }

    /// Every model, by name.
    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values()
    }

    /// Names of the loaded models.
    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// The process's ONNX Runtime environment (there can be only one), for tools that build
    /// sessions of their own beside the registry's, such as the benchmarks.
    pub fn environment(&self) -> Option<&Environment> {
        self.env.as_ref()
    }

    /// The default model's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }
}

/// Sub-folders of `root` that hold a model.toml, sorted by name.
fn model_dirs(root: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("cannot read the models folder {} (--models-dir)", root.display()))?;
    let mut dirs: Vec<_> =
        entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.join("model.toml").is_file()).collect();
    dirs.sort();
    Ok(dirs)
}

fn load_model(
    env: &Environment,
    dir: &Path,
    opts: SessionOptions,
    with_calibration: bool,
    batching: BatchSettings,
    metrics: &Metrics,
) -> anyhow::Result<Model> {
    let manifest = Manifest::load(dir)?;
    let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if manifest.name != folder {
        bail!("{}: model.toml says name = \"{}\"; it must equal the folder name", dir.display(), manifest.name);
    }
    let dim = manifest.output.dim;
    let calibration = if with_calibration { Calibration::load(dir, dim)? } else { None };
    let head = manifest.classifier.as_ref().map(|c| (c.output.as_str(), c.classes.len()));
    let mut encoder =
        Encoder::load(env, &dir.join("model.onnx"), (&manifest.input.name, &manifest.output.name, dim), head, opts)?;

    let pre = manifest.preprocess();
    let warmup = Array4::<f32>::zeros((1, pre.channels(), pre.height as usize, pre.width as usize));
    let out = encoder.embed(warmup.view()).with_context(|| format!("{}: warm-up run failed", dir.display()))?;
    if out.embeddings.iter().chain(out.logits.iter().flatten()).any(|v| !v.is_finite()) {
        bail!("{}: the warm-up run produced non-finite values", dir.display());
    }

    let worker = Worker::spawn(manifest.name.clone(), encoder, batching, metrics.clone())
        .with_context(|| format!("cannot start the inference thread of {}", dir.display()))?;
    Model::new(manifest, calibration, opts.device, worker).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
}
