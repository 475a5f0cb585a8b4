//! Do discriminative features fire on an object's core region? The paper's interpretability
//! claim (Kalibhat et al., AAAI 2024), measured with qscore's own explanations on Fashion-MNIST.
//!
//! Fashion-MNIST garments sit on a black background, so an image's core region is its garment
//! pixels (here: pixel > 25, a tenth of full scale). For each sampled t10k image, every highly
//! activating feature (L) is explained by occlusion ([`qscore::engine::Engine::explain`], the
//! defaults of `POST /v1/explain`: 4 px patch, stride 2); a map's *mass in core* is the share of
//! its positive mass (cells where occluding lowers the feature, weighted by their area) that
//! falls on garment pixels. Chance is the core's share of the image's area. Maps are grouped by
//! discriminative (L ∩ D) against the other active features (L \ D), and by whether the
//! calibration's probe classifies the image correctly. The t10k images are held out from the
//! probe (fitted on the train split).
//!
//! cargo run --release --example explain_core -- MODELS_DIR T10K_DIR PER_CLASS SEED [--write README]
//!
//! Prints the table; with `--write`, writes it into the part of README between
//! `<!-- explain-core -->` and `<!-- /explain-core -->` (appending a section when it has none),
//! replacing the rows of the models it explained and keeping the other models' rows: one run
//! costs minutes per model on two cores, so a new method or the fine-tuned encoders are run on
//! their own. Every calibrated `fmnist-*` model in MODELS_DIR (int8 copies left out) gets rows
//! for both fills (mean, black); the fine-tuned encoders of `make qreg-models` (`*-control`,
//! `*-qreg`) are model folders like any other, their `variant` column saying which.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use qscore::{
    engine::{
        BatchSettings, Capacity, Engine, EngineConfig, Input, Selection,
        explain::{ExplainRequest, Explanation},
    },
    explain::{ExplainLimits, FeatureChoice, Fill},
    image::ImageLimits,
    model::encoder::SessionOptions,
};
use rand::{SeedableRng, seq::SliceRandom};

/// A garment pixel: brighter than a tenth of full scale.
const CORE_THRESHOLD: u8 = 25;

/// Sums for one (model, fill, probe outcome, feature group) cell of the table.
#[derive(Default, Clone)]
struct Tally {
    maps: usize,
    sum: f64,
    sum_sq: f64,
}

impl Tally {
    fn add(&mut self, share: f64) {
        self.maps += 1;
        self.sum += share;
        self.sum_sq += share * share;
    }
    fn merge(&mut self, o: &Tally) {
        self.maps += o.maps;
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
    }
    /// "mean ± 2 standard errors" as percentages, or n/a.
    fn show(&self) -> String {
        if self.maps == 0 {
            return "n/a".into();
        }
        let n = self.maps as f64;
        let mean = self.sum / n;
        let sd = ((self.sum_sq / n - mean * mean).max(0.0) * n / (n - 1.0).max(1.0)).sqrt();
        format!("{:.1} ± {:.1}", 100.0 * mean, 200.0 * sd / n.sqrt())
    }
}

/// Per (model, fill, correct?): images, their mean core area, and the two feature groups.
#[derive(Default, Clone)]
struct Row {
    images: usize,
    core_area: f64,
    discriminative: Tally,
    other: Tally,
    /// Maps with no positive mass (occluding nowhere lowers the feature), left out of the means.
    massless: usize,
}

impl Row {
    fn merge(&mut self, o: &Row) {
        self.images += o.images;
        self.core_area += o.core_area;
        self.discriminative.merge(&o.discriminative);
        self.other.merge(&o.other);
        self.massless += o.massless;
    }
}

/// The garment mask of a 28x28 grey PNG, row-major.
fn core_mask(path: &Path) -> anyhow::Result<(usize, usize, Vec<bool>)> {
    let img = image::open(path).with_context(|| format!("cannot read {}", path.display()))?.to_luma8();
    Ok((img.height() as usize, img.width() as usize, img.pixels().map(|p| p.0[0] > CORE_THRESHOLD).collect()))
}

/// The share of `heatmap`'s positive mass on core pixels.
fn mass_in_core(e: &Explanation, heatmap: &[f32], mask: &[bool]) -> Option<f64> {
    let plan = e.occlusion;
    let (mut inside, mut total) = (0.0_f64, 0.0_f64);
    for y in 0..plan.height {
        for x in 0..plan.width {
            let v = f64::from(heatmap[(y / plan.stride) * e.grid.cols + x / plan.stride].max(0.0));
            total += v;
            if mask[y * plan.width + x] {
                inside += v;
            }
        }
    }
    (total > 0.0).then(|| inside / total)
}

/// Sampled images: `per_class` files of each class folder, seeded.
fn sample(root: &Path, per_class: usize, seed: u64) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {} (make fmnist-data)", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for dir in classes {
        let class = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        files.sort();
        files.shuffle(&mut rng);
        out.extend(files.into_iter().take(per_class).map(|f| (class.clone(), f)));
    }
    Ok(out)
}

/// The table's `variant` column, from the folder names `make qreg-models` gives: `*-qreg` holds a
/// Q-Score-regularised encoder, `*-control` the same fine-tuning without the regulariser, any
/// other one the encoder as trained.
fn variant(name: &str) -> &'static str {
    if name.ends_with("-qreg") {
        "Q-Score regularised"
    } else if name.ends_with("-control") {
        "fine-tuned control"
    } else {
        "as trained"
    }
}

const BEGIN: &str = "<!-- explain-core -->";
const END: &str = "<!-- /explain-core -->";
const COST: &str = "Cost per explanation on this machine (2 cores, some runs beside other jobs): ";
/// What the block said about maps left out before the count moved into each cost note.
const EARLIER: &str = "Rows whose cost note has no count were run together and left out ";

/// What an earlier `--write` left in the README for the models this run did not explain: their
/// table rows, their cost notes, and the sentence about maps left out by runs that counted them
/// together. A run over a few models (one new method, the fine-tuned variants) so keeps the
/// rest of the table instead of dropping it.
#[derive(Default)]
struct Kept {
    rows: Vec<String>,
    costs: Vec<String>,
    earlier: Option<String>,
}

fn kept_from(readme: &Path, explained: &[&str]) -> anyhow::Result<Kept> {
    let text = std::fs::read_to_string(readme).with_context(|| format!("cannot read {}", readme.display()))?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else { return Ok(Kept::default()) };
    let block = &text[a..b.max(a)];
    let ours = |model: &str| explained.contains(&model.trim());
    let mut kept = Kept::default();
    for line in block.lines() {
        if let Some(cells) = line.strip_prefix("| fmnist-") {
            let model = format!("fmnist-{}", cells.split('|').next().unwrap_or_default().trim());
            if !ours(&model) {
                kept.rows.push(line.to_owned());
            }
        } else if let Some(notes) = line.split_once("): ").map(|(_, n)| n).filter(|_| line.starts_with("Cost ")) {
            kept.costs.extend(
                notes
                    .trim_end_matches('.')
                    .split("; ")
                    .filter(|n| !ours(n.split(" (").next().unwrap_or_default()))
                    .map(str::to_owned),
            );
        }
        // The older header counted the left-out maps of all its rows together.
        let total = match (line.find(EARLIER), line.find(" maps with no positive mass are left out")) {
            (Some(i), _) => line[i + EARLIER.len()..].split_whitespace().next(),
            (None, Some(i)) => line[..i].split_whitespace().last(),
            (None, None) => None,
        };
        if let Some(n) = total.filter(|n| n.parse::<usize>().is_ok()) {
            kept.earlier = Some(n.to_owned());
        }
    }
    if kept.costs.iter().all(|c| c.contains("without positive mass")) {
        kept.earlier = None;
    }
    Ok(kept)
}

fn replace_section(readme: &Path, section: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(readme).with_context(|| format!("cannot read {}", readme.display()))?;
    let (begin, end) = (BEGIN, END);
    let block = format!("{begin}\n{section}{end}");
    let new = match (text.find(begin), text.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &text[..a], &text[b + end.len()..]),
        _ => format!(
            "{}\n## Do discriminative features fire on the garment? Occlusion heatmaps against core regions\n\n{block}\n",
            text.trim_end()
        ),
    };
    std::fs::write(readme, new).with_context(|| format!("cannot write {}", readme.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [models_dir, images, per_class, seed, rest @ ..] = args.as_slice() else {
        bail!("usage: explain_core MODELS_DIR T10K_DIR PER_CLASS SEED [--write README]");
    };
    let write = match rest {
        [flag, path] if flag == "--write" => Some(PathBuf::from(path)),
        [] => None,
        _ => bail!("the only option is --write README"),
    };
    let (per_class, seed): (usize, u64) = (per_class.parse()?, seed.parse()?);
    let config = EngineConfig {
        models_dir: PathBuf::from(models_dir),
        default_model: None,
        ort_lib: None,
        session: SessionOptions::default(),
        batching: BatchSettings { max_batch: 32, max_delay: std::time::Duration::from_millis(2) },
        limits: ImageLimits::DEFAULT,
    };
    let mut engine =
        tokio::task::spawn_blocking(move || Engine::open(&config, &Selection::All, Capacity::OFFLINE)).await??;
    // Every feature of L, however many: the comparison needs the other active features too.
    engine.set_explain_limits(ExplainLimits { max_features: 256, ..ExplainLimits::DEFAULT });
    let registry = engine.registry();
    let models: Vec<_> = registry
        .models()
        .filter(|m| m.name().starts_with("fmnist-") && !m.name().ends_with("-int8") && m.calibration.is_some())
        .cloned()
        .collect();
    if models.is_empty() {
        bail!("no calibrated fmnist-* model in {models_dir}");
    }
    let files = sample(Path::new(images), per_class, seed)?;
    let masks: Vec<_> = files.iter().map(|(_, f)| core_mask(f)).collect::<anyhow::Result<_>>()?;
    let fills = [Fill::Mean, Fill::Black];
    // (model, fill, correct) → row.
    let mut rows: BTreeMap<(String, &str, bool), Row> = BTreeMap::new();
    let mut cost = Vec::new();
    for model in &models {
        for fill in fills {
            let fill_name = if fill == Fill::Mean { "mean" } else { "black" };
            let request = ExplainRequest { features: FeatureChoice::Active, fill, ..ExplainRequest::default() };
            let t = Instant::now();
            for ((class, file), (h, w, mask)) in files.iter().zip(&masks) {
                let bytes = std::fs::read(file)?;
                let e = engine
                    .explain(model, Input::new(file.display().to_string(), Ok(bytes.into())), &request)
                    .await
                    .with_context(|| format!("{} on {}", model.name(), file.display()))?;
                if (e.occlusion.height, e.occlusion.width) != (*h, *w) {
                    bail!(
                        "{} takes {}x{} inputs; the images are {h}x{w}",
                        model.name(),
                        e.occlusion.height,
                        e.occlusion.width
                    );
                }
                let correct = e.score.predicted_class.as_deref() == Some(class.as_str());
                let row = rows.entry((model.name().to_owned(), fill_name, correct)).or_default();
                row.images += 1;
                row.core_area += mask.iter().filter(|&&c| c).count() as f64 / mask.len() as f64;
                for f in &e.features {
                    match mass_in_core(&e, &f.heatmap, mask) {
                        Some(share) if f.discriminative => row.discriminative.add(share),
                        Some(share) => row.other.add(share),
                        None => row.massless += 1,
                    }
                }
            }
            let massless: usize = rows
                .iter()
                .filter(|((m, f, _), _)| m == model.name() && *f == fill_name)
                .map(|(_, r)| r.massless)
                .sum();
            cost.push(format!(
                "{} ({fill_name}): {:.1} ms per explanation, maps without positive mass: {massless}",
                model.name(),
                t.elapsed().as_secs_f64() * 1e3 / files.len() as f64
            ));
        }
    }

    let explained: Vec<&str> = models.iter().map(|m| m.name()).collect();
    let kept = match &write {
        Some(readme) => kept_from(readme, &explained)?,
        None => Kept::default(),
    };
    let mut lines: Vec<String> = kept.rows;
    for model in &models {
        for fill in ["mean", "black"] {
            let get = |c: bool| rows.get(&(model.name().to_owned(), fill, c)).cloned().unwrap_or_default();
            let mut all = get(true);
            all.merge(&get(false));
            for (label, row) in [("correct", get(true)), ("wrong", get(false)), ("all", all)] {
                let area = if row.images > 0 {
                    format!("{:.1}", 100.0 * row.core_area / row.images as f64)
                } else {
                    "n/a".into()
                };
                lines.push(format!(
                    "| {} | {} | {fill} | {label} | {} | {area} | {} | {} | {} | {} |",
                    model.name(),
                    variant(model.name()),
                    row.images,
                    row.discriminative.maps,
                    row.discriminative.show(),
                    row.other.maps,
                    row.other.show(),
                ));
            }
        }
    }
    // Sorted by model, each model's rows in the order they were made (mean before black,
    // correct, wrong, all): a stable sort on the model column alone.
    lines.sort_by(|a, b| a.split('|').nth(1).cmp(&b.split('|').nth(1)));
    let table = format!(
        "| model | variant | fill | probe | images | core area | L ∩ D maps | L ∩ D mass in core | L \\ D maps | L \\ D mass in core |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|\n{}\n",
        lines.join("\n")
    );
    let mut costs = kept.costs;
    costs.extend(cost);
    costs.sort_by(|a, b| a.split(" (").next().cmp(&b.split(" (").next()));
    let earlier = kept.earlier.map(|n| format!(" {EARLIER}{n} maps in all.")).unwrap_or_default();
    let section = format!(
        "Made by `make explain-core` (`cargo run --release --example explain_core -- MODELS_DIR {images} {per_class} {seed} --write models/README.md`; \
         MODELS_DIR is `models`, or `make qreg-models`'s folder for the fine-tuned encoders): \
         {per_class} t10k images per class ({} images, seeded sample {seed}), every active feature (L) of each explained by occlusion with \
         `POST /v1/explain`'s defaults (4 px patch, stride 2, 169 passes), filled with the normalisation mean and with black. \
         Mass in core: the share of a map's positive mass on garment pixels (> {CORE_THRESHOLD}/255), in %, mean ± 2 standard errors over maps; \
         core area: the garments' share of the image (chance). Probe: the calibration's linear probe on the image (t10k is held out from it). \
         Maps with no positive mass (occluding nowhere lowers the feature) are left out of the means; the cost notes count them.{earlier} \
         A run over some of the models replaces their rows and keeps the others'.\n\n{table}\n{COST}{}.\n",
        files.len(),
        costs.join("; ")
    );
    print!("{section}");
    if let Some(readme) = write {
        replace_section(&readme, &section)?;
        eprintln!("wrote the table into {}", readme.display());
    }
    Ok(())
}
