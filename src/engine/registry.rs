//! The models being served, each with its own inference worker: what a model folder holds at
//! rest ([`crate::model`]) joined to the thread that runs it, and the [`Loader`] that turns
//! folders into models, at start-up and again whenever a folder changes.
//!
//! Start-up order, as TEI does it: load every model, check its manifest against the graph, run
//! one warm-up batch, and only then hand the registry to the server. A model that fails any
//! step stops start-up with a message naming the folder. Later loads ([`Loader::reload`]) go
//! through the same steps beside the version being served, and a failure there leaves that
//! version serving ([`LoadFailure`]).
//!
//! A [`Registry`] never changes once built: a reload builds a new one, and the engine swaps it
//! in whole, so a request that took a model keeps that version (and its worker) to the end.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

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
        manifest::{Manifest, Precision, Preprocess, QScoreParams},
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
            if c.model != manifest.name {
                return Err(format!(
                    "calibration.json was made for model `{}`, not `{}`: its D, probe and thresholds belong to \
                     that model's features; run `qscore calibrate --model {}`, or put back this model's calibration",
                    c.model, manifest.name, manifest.name
                ));
            }
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

    /// Whether its flag reads the client's classifier confidence per image: calibrated on
    /// `user_confidence` (directly or through a combination) and with no head of its own, whose
    /// softmax would give it.
    pub fn needs_client_confidence(&self) -> bool {
        self.calibration.as_ref().is_some_and(Calibration::needs_user_confidence) && self.manifest.classifier.is_none()
    }
}

/// Which models to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every model folder, each with its calibration when it has one: what the server runs.
    All,
    /// One model with its calibration: what `qscore score --model NAME` runs, so a backfill pod
    /// loads and holds only the model it scores with.
    One(String),
    /// One model without its calibration: what `qscore calibrate` embeds with, so that a stale
    /// or broken calibration.json never stands in the way of writing a new one.
    Uncalibrated(String),
}

/// A model folder whose current contents did not load; the version loaded before (if any)
/// keeps serving.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct LoadFailure {
    /// The folder's name under `--models-dir` (the model's name).
    pub model: String,
    /// What went wrong and what to fix.
    pub error: String,
    /// When the load was tried, in seconds since the Unix epoch.
    pub failed_at_unix_s: u64,
    /// The version still serving under this name, if one is.
    pub serving_version: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    fingerprint: Fingerprint,
    #[serde(skip)]
    #[schema(ignore)]
    digest: Option<String>,
}

impl LoadFailure {
    fn new(model: &str, error: String, serving_version: Option<String>, source: Source) -> Self {
        Self {
            model: model.to_owned(),
            error,
            failed_at_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            serving_version,
            fingerprint: source.fingerprint,
            digest: source.digest,
        }
    }
}

/// What a folder held when it was loaded (or failed to): its cheap fingerprint, and the digest
/// of its files' contents, which says whether a changed fingerprint changed anything.
#[derive(Debug, Clone, Default)]
struct Source {
    fingerprint: Fingerprint,
    digest: Option<String>,
}

impl Source {
    fn of(dir: &Path, fingerprint: Fingerprint) -> Self {
        Self { fingerprint, digest: content_digest(dir) }
    }
}

/// Every loaded model, by name: one immutable version of what is served.
pub struct Registry {
    models: BTreeMap<String, Arc<Model>>,
    default: String,
    /// What each model's folder held when it was loaded.
    loaded_from: BTreeMap<String, Source>,
    failures: BTreeMap<String, LoadFailure>,
}

impl Registry {
    /// A registry of models built elsewhere (in-process tests with a fake encoder); the first
    /// is the default.
    pub fn from_models(models: Vec<Model>) -> anyhow::Result<Self> {
        let default = models.first().map(|m| m.name().to_owned()).context("a registry needs a model")?;
        let models = models.into_iter().map(|m| (m.name().to_owned(), Arc::new(m))).collect();
        Ok(Self { models, default, loaded_from: BTreeMap::new(), failures: BTreeMap::new() })
    }

    /// The model called `name`, or the default one. The `Arc` keeps this version (and its
    /// inference thread) alive for as long as the caller holds it, whatever reloads meanwhile.
    pub fn get(&self, name: Option<&str>) -> Result<Arc<Model>, Error> {
        let name = name.unwrap_or(&self.default);
        self.models
            .get(name)
            .cloned()
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

    /// The default model's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Model folders whose current contents failed to load, by name.
    pub fn failures(&self) -> impl Iterator<Item = &LoadFailure> {
        self.failures.values()
    }
}

/// What a model folder looks like on disk, cheaply: each regular file's name, size,
/// modification time and inode (rsync's quick check, plus the inode so that a file renamed
/// over another is seen even with the same size and time). Two equal fingerprints a poll apart
/// mean the folder has settled; a fingerprint unlike the one loaded means the folder changed.
/// Symlinks are followed, so a Kubernetes ConfigMap or Secret volume (files linked through
/// `..data`) changes its fingerprint when it is swapped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<(String, u64, Option<SystemTime>, u64)>);

impl Fingerprint {
    fn of(dir: &Path) -> Self {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let meta = std::fs::metadata(e.path()).ok().filter(std::fs::Metadata::is_file)?;
                let name = e.file_name().to_string_lossy().into_owned();
                Some((name, meta.len(), meta.modified().ok(), std::os::unix::fs::MetadataExt::ino(&meta)))
            })
            .collect();
        files.sort();
        Self(files)
    }
}

/// SHA-256 over a folder's regular files (names, sizes and bytes, in name order); `None` when a
/// file cannot be read. Computed only when a fingerprint changed or on SIGHUP, so that `touch`
/// or a copy that keeps the bytes does not reload a model, and a replacement that keeps sizes and
/// times (`rsync -a`, `tar`, normalised build times) is still seen on SIGHUP.
fn content_digest(dir: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<_> = std::fs::read_dir(dir).ok()?.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    let mut hash = Sha256::new();
    for path in files {
        let meta = std::fs::metadata(&path).ok()?;
        if !meta.is_file() {
            continue;
        }
        let mut file = std::fs::File::open(&path).ok()?;
        hash.update(path.file_name()?.as_encoded_bytes());
        hash.update(meta.len().to_le_bytes());
        std::io::copy(&mut file, &mut hash).ok()?;
    }
    Some(crate::digest::hex(&hash.finalize()))
}

/// Every model folder under the models folder (a sub-folder with a model.toml whose name does
/// not start with `.`, so staging folders and a volume's `..data` are left out), by name, with
/// its fingerprint.
pub fn scan(root: &Path) -> anyhow::Result<BTreeMap<String, Fingerprint>> {
    Ok(model_dirs(root)?
        .into_iter()
        .filter_map(|d| {
            let name = d.file_name()?.to_str()?.to_owned();
            Some((name, Fingerprint::of(&d)))
        })
        .collect())
}

/// What one [`Loader::reload`] did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Folders loaded anew (added or replaced).
    pub loaded: Vec<String>,
    /// Folders that failed to load; the version before (if any) still serves.
    pub failed: Vec<String>,
    /// Models no longer served because their folder is gone.
    pub removed: Vec<String>,
    /// Folders that had never loaded and are gone.
    pub forgotten: Vec<String>,
    /// Folders that had failed and now hold again exactly what serves.
    pub restored: Vec<String>,
}

impl Reloaded {
    /// Whether anything changed in what is served or reported.
    pub fn changed(&self) -> bool {
        [&self.loaded, &self.failed, &self.removed, &self.forgotten, &self.restored].iter().any(|v| !v.is_empty())
    }
}

/// Turns model folders into served models: ONNX Runtime's environment (one per process), the
/// session and batching settings, and where the models live. Owned by the engine for as long
/// as it serves, so that folders can be loaded again.
pub struct Loader {
    // Sessions are built in the process-wide environment; it outlives every model.
    env: Environment,
    models_dir: PathBuf,
    default_model: Option<String>,
    opts: SessionOptions,
    batching: BatchSettings,
    metrics: Metrics,
}

impl Loader {
    /// Starts ONNX Runtime for `config`'s models.
    pub fn start(config: &EngineConfig, metrics: &Metrics) -> anyhow::Result<Self> {
        let lib = runtime::locate(config.ort_lib.as_deref())?;
        let env = runtime::start(&lib)?;
        tracing::info!(library = %lib.display(), "ONNX Runtime loaded");
        Ok(Self {
            env,
            models_dir: config.models_dir.clone(),
            default_model: config.default_model.clone(),
            opts: config.session,
            batching: config.batching,
            metrics: metrics.clone(),
        })
    }

    /// The models folder this loader watches.
    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// The process's ONNX Runtime environment (there can be only one), for tools that build
    /// sessions of their own beside the registry's, such as the benchmarks.
    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// Loads, checks and warms up the selected model folders at start-up. Serving every folder,
    /// one that fails is reported as a reload's failure would be (the others serve; an operator
    /// sees the same state whether the folder broke before or after start-up); the `--model`
    /// default failing, or every folder, stops start-up. A selected single model must load.
    pub fn load(&self, selection: &Selection) -> anyhow::Result<Registry> {
        let mut dirs = model_dirs(&self.models_dir)?;
        if let Selection::Uncalibrated(name) | Selection::One(name) = selection {
            let all: Vec<String> = dirs.iter().filter_map(|d| d.file_name()?.to_str().map(str::to_owned)).collect();
            dirs.retain(|d| d.file_name().is_some_and(|n| n == name.as_str()));
            if dirs.is_empty() {
                bail!("no model `{name}` under {}; found: {}", self.models_dir.display(), all.join(", "));
            }
        }
        let with_calibration = !matches!(selection, Selection::Uncalibrated(_));
        let (mut models, mut loaded_from, mut failures) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let tolerant = *selection == Selection::All;
        for dir in &dirs {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            let source = Source::of(dir, Fingerprint::of(dir));
            match self.load_dir(dir, with_calibration) {
                Ok(model) => {
                    self.announce(&model, None);
                    loaded_from.insert(name.clone(), source);
                    models.insert(name, Arc::new(model));
                }
                Err(e) if tolerant && self.default_model.as_deref() != Some(name.as_str()) => {
                    let error = format!("{e:#}");
                    tracing::error!(
                        model = %name,
                        "cannot load {}: {error}; the other models serve, and this folder is tried again when it \
                         changes, or on SIGHUP",
                        dir.display()
                    );
                    self.metrics.model_load_failing.with_label_values(&[&name]).set(1);
                    failures.insert(name.clone(), LoadFailure::new(&name, error, None, source));
                }
                Err(e) => return Err(e),
            }
        }
        if models.is_empty() {
            if let Some(f) = failures.values().next() {
                bail!("no model under {} loads; {}: {}", self.models_dir.display(), f.model, f.error);
            }
            bail!(
                "no model found under {}: each model is a folder with model.onnx and model.toml",
                self.models_dir.display()
            );
        }
        if let Some(name) = self.default_model.as_ref().filter(|n| !models.contains_key(*n)) {
            bail!(
                "--model {name} is not among the loaded models: {}",
                models.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let default = self.default_for(&models);
        Ok(Registry { models, default, loaded_from, failures })
    }

    /// The registry that serves `folders` (what [`scan`] found, settled), built from `current`.
    /// A folder whose fingerprint differs from the one loaded (every folder when `recheck`: a
    /// SIGHUP) has its contents compared with what was loaded: the same bytes change nothing
    /// (and end a failure in between), new bytes are loaded and warmed up beside the version
    /// serving, unless they are the very bytes that last failed. A folder gone from `folders` is
    /// dropped, except the default model's, which keeps serving (requests that name no model
    /// must not silently move to another). A folder that fails keeps its old version serving
    /// and is reported. `None` when nothing changed. Blocking: loading runs ONNX Runtime.
    pub fn reload(
        &self,
        current: &Registry,
        folders: &BTreeMap<String, Fingerprint>,
        recheck: bool,
    ) -> (Option<Registry>, Reloaded) {
        let mut done = Reloaded::default();
        let mut models = current.models.clone();
        let mut loaded_from = current.loaded_from.clone();
        let mut failures = current.failures.clone();

        for (name, fingerprint) in folders {
            let same = |s: Option<&Fingerprint>| s == Some(fingerprint);
            let failing = failures.contains_key(name);
            if !recheck
                && ((same(loaded_from.get(name).map(|s| &s.fingerprint)) && !failing)
                    || same(failures.get(name).map(|f| &f.fingerprint)))
            {
                continue;
            }
            let dir = self.models_dir.join(name);
            let source = Source::of(&dir, fingerprint.clone());
            let unchanged = |digest: Option<&Option<String>>| source.digest.is_some() && digest == Some(&source.digest);
            if unchanged(loaded_from.get(name).map(|s| &s.digest)) {
                // The bytes that serve (touched, or put back as they were): a failure of other
                // contents in between is over.
                if failures.remove(name).is_some() {
                    self.metrics.model_load_failing.with_label_values(&[name]).set(0);
                    done.restored.push(name.clone());
                }
                loaded_from.insert(name.clone(), source);
                continue;
            }
            if unchanged(failures.get(name).map(|f| &f.digest)) {
                continue;
            }
            match self.load_dir(&dir, true) {
                Ok(model) => {
                    self.announce(&model, models.get(name).map(AsRef::as_ref));
                    self.metrics.model_reloads.with_label_values(&[name, "loaded"]).inc();
                    failures.remove(name);
                    loaded_from.insert(name.clone(), source);
                    models.insert(name.clone(), Arc::new(model));
                    done.loaded.push(name.clone());
                }
                Err(e) => {
                    let serving_version = models.get(name).map(|m| m.manifest.version.clone());
                    let error = format!("{e:#}");
                    tracing::error!(
                        model = %name,
                        serving = serving_version.as_deref().unwrap_or("nothing"),
                        "cannot load {}: {error}; fix the folder (the version before keeps serving) \
                         and it is tried again when it changes, or at once on SIGHUP",
                        dir.display()
                    );
                    self.metrics.model_reloads.with_label_values(&[name, "failed"]).inc();
                    self.metrics.model_load_failing.with_label_values(&[name]).set(1);
                    failures.insert(name.clone(), LoadFailure::new(name, error, serving_version, source));
                    done.failed.push(name.clone());
                }
            }
        }

        let gone: Vec<String> =
            models.keys().chain(failures.keys()).filter(|n| !folders.contains_key(*n)).cloned().collect();
        for name in gone {
            let Some(model) = models.get(&name) else {
                // A folder that never loaded: nothing served, nothing to say any more.
                failures.remove(&name);
                self.metrics.forget_model(&name);
                done.forgotten.push(name);
                continue;
            };
            if name == current.default {
                if !failures.get(&name).is_some_and(|f| f.serving_version.is_some() && f.digest.is_none()) {
                    let error = format!(
                        "the folder is gone from {}; as the default model it keeps serving (requests that name no \
                         model must not move to another one), until it is put back or the server restarts",
                        self.models_dir.display()
                    );
                    tracing::error!(model = %name, "{error}");
                    self.metrics.model_load_failing.with_label_values(&[&name]).set(1);
                    let version = Some(model.manifest.version.clone());
                    failures.insert(name.clone(), LoadFailure::new(&name, error, version, Source::default()));
                    done.failed.push(name);
                }
                continue;
            }
            failures.remove(&name);
            self.retire(model);
            self.metrics.forget_model(&name);
            self.metrics.model_reloads.with_label_values(&[&name, "removed"]).inc();
            tracing::info!(model = %name, "model folder removed: no longer served");
            models.remove(&name);
            loaded_from.remove(&name);
            done.removed.push(name);
        }

        if !done.changed() {
            return (None, done);
        }
        (Some(Registry { models, default: current.default.clone(), loaded_from, failures }), done)
    }

    /// `--model` when it is loaded, else the first model by name.
    fn default_for(&self, models: &BTreeMap<String, Arc<Model>>) -> String {
        self.default_model
            .clone()
            .filter(|n| models.contains_key(n))
            .or_else(|| models.keys().next().cloned())
            .unwrap_or_default()
    }

    /// Publishes `model` in `qscore_model_info` (replacing `before`'s labels) and the log.
    fn announce(&self, model: &Model, before: Option<&Model>) {
        if let Some(old) = before {
            self.retire(old);
        }
        let device = self.opts.device.to_string();
        let sha = model.calibration.as_ref().map_or("", |c| c.sha256.as_str());
        self.metrics.model_info.with_label_values(&[model.name(), &model.manifest.version, &device, sha]).set(1);
        self.metrics.model_load_failing.with_label_values(&[model.name()]).set(0);
        tracing::info!(
            model = model.name(),
            version = %model.manifest.version,
            device = %self.opts.device,
            calibration_sha256 = sha,
            replaced = before.map(|m| m.manifest.version.as_str()),
            "model ready"
        );
    }

    fn retire(&self, model: &Model) {
        let device = self.opts.device.to_string();
        let sha = model.calibration.as_ref().map_or("", |c| c.sha256.as_str());
        // Absent labels (never published) are not an error worth reporting.
        let _ = self.metrics.model_info.remove_label_values(&[model.name(), &model.manifest.version, &device, sha]);
    }

    fn load_dir(&self, dir: &Path, with_calibration: bool) -> anyhow::Result<Model> {
        let manifest = Manifest::load(dir)?;
        let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if manifest.name != folder {
            bail!("{}: model.toml says name = \"{}\"; it must equal the folder name", dir.display(), manifest.name);
        }
        if manifest.precision == Precision::Fp16 && self.opts.device == Device::Cpu {
            bail!(
                "{}: model.toml says precision = \"fp16\": this graph is made for --device cuda, and ONNX Runtime's \
                 CPU execution provider runs it at about half the speed of the float32 model it came from; serve \
                 the float32 folder (models/) on CPU, or run with --device cuda",
                dir.display()
            );
        }
        let dim = manifest.output.dim;
        let calibration = if with_calibration { Calibration::load(dir, dim)? } else { None };
        let mut encoder = Encoder::load_folder(&self.env, dir, &manifest, self.opts)?;

        let pre = manifest.preprocess();
        let warmup = Array4::<f32>::zeros((1, pre.channels(), pre.height as usize, pre.width as usize));
        let out = encoder.embed(warmup.view()).with_context(|| format!("{}: warm-up run failed", dir.display()))?;
        if out.embeddings.iter().chain(out.logits.iter().flatten()).any(|v| !v.is_finite()) {
            bail!("{}: the warm-up run produced non-finite values", dir.display());
        }

        let worker = Worker::spawn(manifest.name.clone(), encoder, self.batching, self.metrics.clone())
            .with_context(|| format!("cannot start the inference thread of {}", dir.display()))?;
        Model::new(manifest, calibration, self.opts.device, worker)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
    }
}

/// Sub-folders of `root` that hold a model.toml and whose name does not start with `.`,
/// sorted by name.
fn model_dirs(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("cannot read the models folder {} (--models-dir)", root.display()))?;
    let mut dirs: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.join("model.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}
