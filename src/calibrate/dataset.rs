//! The labelled images calibration reads: ImageFolder layout (`ROOT/<class>/<image>`), split
//! into fit, select and test parts, stratified by class and seeded.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Which part of the calibration an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// Trains the probe, gives A_j and D, and is the neighbour set.
    Fit,
    /// Held out: picks the estimator, fits the isotonic map and tau.
    Select,
    /// Held out and untouched by any choice: every reported figure.
    Test,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Self::Fit => "fit",
            Self::Select => "select",
            Self::Test => "test",
        }
    }
}

/// One labelled image.
#[derive(Debug, Clone)]
pub struct LabelledImage {
    /// Where it is.
    pub path: PathBuf,
    /// Its class, an index into [`Dataset::classes`].
    pub class: usize,
    /// Its part.
    pub part: Part,
    /// File size in bytes (part of the fingerprint).
    pub size: u64,
}

/// The whole labelled set, split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Class folder names, sorted: the label order.
    pub classes: Vec<String>,
    /// Every image, class by class, in a fixed order.
    pub images: Vec<LabelledImage>,
    /// Files found in class folders that are not images by their extension.
    pub ignored: Vec<PathBuf>,
}

/// How to split.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    /// Share of each class in the fit part (one folder only).
    pub fit_fraction: f64,
    /// Share of each class's held-out images in the select part.
    pub select_fraction: f64,
    /// Seed of the shuffles.
    pub seed: u64,
}

/// One ImageFolder root, read.
struct Folder {
    /// Class names, sorted.
    classes: Vec<String>,
    /// Each class's image files with their sizes, sorted.
    files: Vec<Vec<(PathBuf, u64)>>,
    /// Files that are not images by their extension.
    ignored: Vec<PathBuf>,
}

/// Reads the class folders of one ImageFolder root.
fn image_folder(root: &Path) -> anyhow::Result<Folder> {
    let entries = std::fs::read_dir(root)
        .with_context(|| format!("cannot read {}: expected ImageFolder layout ROOT/<class>/<image>", root.display()))?;
    let mut classes: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(|n| (n.to_owned(), e.path())))
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    classes.sort();
    if classes.len() < 2 {
        bail!(
            "{} has {} class folders; calibration needs at least two (ROOT/<class>/<image>)",
            root.display(),
            classes.len()
        );
    }
    let mut files = Vec::with_capacity(classes.len());
    let mut ignored = Vec::new();
    for (_, dir) in &classes {
        let mut images = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry?.path();
            if !path.is_file() {
                continue;
            }
            if crate::image::has_image_extension(&path) {
                let size = path.metadata()?.len();
                images.push((path, size));
            } else {
                ignored.push(path);
            }
        }
        images.sort();
        if images.is_empty() {
            bail!("class folder {} holds no image", dir.display());
        }
        files.push(images);
    }
    Ok(Folder { classes: classes.into_iter().map(|(n, _)| n).collect(), files, ignored })
}

impl Dataset {
    /// One labelled folder, split into fit / select / test.
    pub fn from_folder(root: &Path, split: Split) -> anyhow::Result<Self> {
        check_fraction("--fit-fraction", split.fit_fraction)?;
        check_fraction("--select-fraction", split.select_fraction)?;
        let Folder { classes, files, ignored } = image_folder(root)?;
        let mut rng = ChaCha8Rng::seed_from_u64(split.seed);
        let mut images = Vec::new();
        for (class, mut list) in files.into_iter().enumerate() {
            list.shuffle(&mut rng);
            let n_fit = share(list.len(), split.fit_fraction);
            let held = list.split_off(n_fit);
            images.extend(list.into_iter().map(|(path, size)| LabelledImage { path, class, part: Part::Fit, size }));
            images.extend(split_held_out(held, class, split.select_fraction, &mut rng));
        }
        Ok(Self { classes, images, ignored })
    }

    /// A fit folder and a held-out folder (split into select / test); both must have the same
    /// classes.
    pub fn from_folders(fit: &Path, holdout: &Path, split: Split) -> anyhow::Result<Self> {
        check_fraction("--select-fraction", split.select_fraction)?;
        let Folder { classes, files: fit_files, mut ignored } = image_folder(fit)?;
        let Folder { classes: held_classes, files: held_files, ignored: more } = image_folder(holdout)?;
        if classes != held_classes {
            bail!(
                "{} and {} must have the same class folders; they have [{}] and [{}]",
                fit.display(),
                holdout.display(),
                classes.join(", "),
                held_classes.join(", ")
            );
        }
        ignored.extend(more);
        let mut rng = ChaCha8Rng::seed_from_u64(split.seed);
        let mut images = Vec::new();
        for (class, (fit_list, held)) in fit_files.into_iter().zip(held_files).enumerate() {
            images.extend(fit_list.into_iter().map(|(path, size)| LabelledImage {
                path,
                class,
                part: Part::Fit,
                size,
            }));
            images.extend(split_held_out(held, class, split.select_fraction, &mut rng));
        }
        Ok(Self { classes, images, ignored })
    }

    /// Images per class in `part` among `used` (indices into `images`): the ones that scored,
    /// so images left out as unreadable are not counted as fitted or measured on.
    pub fn per_class(&self, part: Part, used: &[usize]) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for img in used.iter().map(|&i| &self.images[i]).filter(|i| i.part == part) {
            counts[img.class] += 1;
        }
        counts
    }

    /// SHA-256 over the sorted "part class/file size" lines: two runs on the same files and split
    /// give the same hash.
    pub fn fingerprint(&self) -> String {
        let mut lines: Vec<String> = self
            .images
            .iter()
            .map(|i| {
                let file = i.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
                format!("{} {}/{} {}\n", i.part.name(), self.classes[i.class], file, i.size)
            })
            .collect();
        lines.sort();
        let mut hash = Sha256::new();
        lines.iter().for_each(|l| hash.update(l.as_bytes()));
        crate::digest::hex(&hash.finalize())
    }
}

/// Splits one class's already shuffled held-out images into select and test.
fn split_held_out(
    held: Vec<(PathBuf, u64)>,
    class: usize,
    select_fraction: f64,
    rng: &mut ChaCha8Rng,
) -> impl Iterator<Item = LabelledImage> {
    let mut held = held;
    held.shuffle(rng);
    let n_select = share(held.len(), select_fraction);
    held.into_iter().enumerate().map(move |(i, (path, size))| LabelledImage {
        path,
        class,
        part: if i < n_select { Part::Select } else { Part::Test },
        size,
    })
}

fn share(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).round() as usize).min(n)
}

fn check_fraction(flag: &str, f: f64) -> anyhow::Result<()> {
    if !(f > 0.0 && f < 1.0) {
        bail!("{flag} must lie strictly between 0 and 1, got {f}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str, per_class: &[usize]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("qscore-ds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (c, &n) in per_class.iter().enumerate() {
            let dir = root.join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                std::fs::write(dir.join(format!("{i:03}.png")), [c as u8; 3]).unwrap();
            }
        }
        std::fs::write(root.join("class0").join("notes.txt"), "x").unwrap();
        root
    }

    /// 10 and 20 images, fit 0.5 and select 0.5: 5 + 10 fit; held-out 5 -> round(2.5) = 3
    /// select (rounding half away from zero) and 2 test; held-out 10 -> 5 and 5.
    #[test]
    fn stratified_and_seeded() {
        let root = folder("split", &[10, 20]);
        let split = Split { fit_fraction: 0.5, select_fraction: 0.5, seed: 7 };
        let ds = Dataset::from_folder(&root, split).unwrap();
        assert_eq!(ds.classes, vec!["class0", "class1"]);
        let all: Vec<usize> = (0..ds.images.len()).collect();
        assert_eq!(ds.per_class(Part::Fit, &all), vec![5, 10]);
        assert_eq!(ds.per_class(Part::Select, &all), vec![3, 5]);
        assert_eq!(ds.per_class(Part::Test, &all), vec![2, 5]);
        let first_fit = ds.images.iter().position(|i| i.part == Part::Fit && i.class == 1).unwrap();
        let scored: Vec<usize> = all.iter().copied().filter(|&i| i != first_fit).collect();
        assert_eq!(ds.per_class(Part::Fit, &scored), vec![5, 9], "an image that did not score is not counted");
        assert_eq!(ds.ignored.len(), 1, "notes.txt is reported, not read");
        let again = Dataset::from_folder(&root, split).unwrap();
        assert_eq!(ds.fingerprint(), again.fingerprint(), "same seed, same split");
        let other = Dataset::from_folder(&root, Split { seed: 8, ..split }).unwrap();
        assert_ne!(ds.fingerprint(), other.fingerprint(), "another seed, another split");
        assert!(Dataset::from_folder(&root, Split { fit_fraction: 1.0, ..split }).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn folders_must_agree_on_classes() {
        let a = folder("a", &[2, 2]);
        let b = folder("b", &[2, 2, 2]);
        let split = Split { fit_fraction: 0.5, select_fraction: 0.5, seed: 0 };
        assert!(Dataset::from_folders(&a, &b, split).unwrap_err().to_string().contains("same class folders"));
        let ds = Dataset::from_folders(&a, &a, split).unwrap();
        let all: Vec<usize> = (0..ds.images.len()).collect();
        assert_eq!(ds.per_class(Part::Fit, &all), vec![2, 2]);
        assert_eq!(ds.per_class(Part::Select, &all), vec![1, 1]);
        for p in [a, b] {
            std::fs::remove_dir_all(p).unwrap();
        }
    }
}
