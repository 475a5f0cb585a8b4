//! `qscore calibrate --predictions FILE`: the user's own classifier's answers on the labelled
//! images, so that "misclassified" means *its* mistakes, not qscore's probe's.
//!
//! The file is a CSV with a header naming the columns `path`, `predicted` and optionally
//! `confidence` (any order, any case; other columns are ignored, so a file exported with a
//! `label` or `logits` column needs no editing). `path` is the image's path relative to its
//! ImageFolder root, `<class>/<file>`; with `--fit` and `--holdout` it may also start with the
//! root folder's own name (`train/coat/1.png`), which is required only when both roots hold an
//! image of the same class and file name. Every image needs exactly one row and every row
//! one image: a mismatch is an error that names the line, never a silent drop, because a flag
//! calibrated on the wrong rows would predict someone else's mistakes.
//!
//! Paths and class names are compared in Unicode NFC: macOS writes file names decomposed (NFD)
//! and most tools write composed text, so `Café/1.png` from a CSV made on one system names the
//! folder `Café` made on the other.

use std::{
    collections::{HashMap, hash_map::Entry},
    path::Path,
};

use anyhow::{Context, bail};
use unicode_normalization::UnicodeNormalization;

use super::dataset::Dataset;

/// The user's classifier on every image of a dataset, in the dataset's image order.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// Predicted class of each image, an index into [`Dataset::classes`].
    pub predicted: Vec<usize>,
    /// The classifier's probability for its prediction, per image, when the file has the column.
    pub confidence: Option<Vec<f32>>,
    /// SHA-256 of the file's bytes, recorded in calibration.json.
    pub sha256: String,
}

/// Largest predictions file read, in bytes: far more than one line per calibration image.
pub const MAX_PREDICTIONS_BYTES: u64 = 1 << 30;

/// Reads `file` and matches its rows to `dataset`'s images.
pub fn read(file: &Path, dataset: &Dataset) -> anyhow::Result<Predictions> {
    let bytes = crate::regular_file::read(file, MAX_PREDICTIONS_BYTES)
        .with_context(|| format!("cannot read --predictions {}", file.display()))?;
    let sha256 = crate::digest::sha256_hex(&bytes);
    let (predicted, confidence) = parse(&bytes, dataset).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(Predictions { predicted, confidence, sha256 })
}

/// A value from the file as an error message quotes it: at most 120 characters, so a huge field
/// never becomes a huge message.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(120).collect();
    if cut.len() < text.len() { format!("{cut:?}… ({} bytes)", text.len()) } else { format!("{cut:?}") }
}

/// A CSV reader's error with the line it happened on.
fn malformed(e: &csv::Error) -> anyhow::Error {
    match e.position() {
        Some(p) => anyhow::anyhow!("line {}: malformed CSV: {e}", p.line()),
        None => anyhow::anyhow!("malformed CSV: {e}"),
    }
}

/// The CSV's rows matched to `dataset`'s images: the predicted class of each image and, when
/// the file has a `confidence` column, each image's confidence.
fn parse(bytes: &[u8], dataset: &Dataset) -> anyhow::Result<(Vec<usize>, Option<Vec<f32>>)> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(false).from_reader(bytes);
    let header = reader.headers().map_err(|e| malformed(&e))?.clone();
    let names: Vec<String> = header.iter().map(|h| h.trim_start_matches('\u{feff}').to_ascii_lowercase()).collect();
    for wanted in ["path", "predicted", "confidence"] {
        if names.iter().filter(|n| *n == wanted).count() > 1 {
            bail!("the header names `{wanted}` more than once; keep one `{wanted}` column");
        }
    }
    let column = |name: &str| names.iter().position(|n| n == name);
    let (Some(path_col), Some(predicted_col)) = (column("path"), column("predicted")) else {
        bail!(
            "the header must name the columns `path` and `predicted` (and optionally `confidence`); it has: {}",
            shown(&header.iter().collect::<Vec<_>>().join(", "))
        );
    };
    let confidence_col = column("confidence");
    let class_of: HashMap<String, usize> = dataset.classes.iter().enumerate().map(|(i, c)| (nfc(c), i)).collect();

    // Each image answers to `<class>/<file>` and `<root>/<class>/<file>`; a key two images
    // share (two roots holding the same file) maps to None, and a row using it is refused.
    let mut by_key: HashMap<String, Option<usize>> = HashMap::new();
    for (i, img) in dataset.images.iter().enumerate() {
        let file = img.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
        let short = nfc(&format!("{}/{file}", dataset.classes[img.class]));
        let root = img.path.parent().and_then(Path::parent).and_then(Path::file_name);
        let long = root.map(|r| format!("{}/{short}", nfc(&r.to_string_lossy())));
        for key in std::iter::once(short).chain(long) {
            match by_key.entry(key) {
                Entry::Occupied(mut e) if *e.get() != Some(i) => *e.get_mut() = None,
                Entry::Occupied(_) => {}
                Entry::Vacant(e) => {
                    e.insert(Some(i));
                }
            }
        }
    }

    // The line of the row that claimed each image, its class and its confidence.
    let mut rows: Vec<Option<(u64, usize, Option<f32>)>> = vec![None; dataset.images.len()];
    for record in reader.records() {
        let record = record.map_err(|e| malformed(&e))?;
        let line = record.position().map_or(0, csv::Position::line);
        let path = normalise(&record[path_col]);
        let image = match by_key.get(&path) {
            Some(Some(i)) => *i,
            Some(None) => bail!(
                "line {line}: `path` {} matches an image in each of two roots; start it with the root \
                 folder's name (and give the two roots different names if they share one)",
                shown(&path)
            ),
            None => bail!(
                "line {line}: no image at `path` {}; paths are <class>/<file> under the dataset root",
                shown(&path)
            ),
        };
        let predicted = &record[predicted_col];
        let Some(&class) = class_of.get(&nfc(predicted)) else {
            bail!(
                "line {line}: `predicted` is {}, which is not a class folder; the classes are: {}",
                shown(predicted),
                dataset.classes.join(", ")
            );
        };
        let confidence = match confidence_col.map(|c| &record[c]) {
            None => None,
            Some(text) => match text.parse::<f64>() {
                Ok(v) if v.is_finite() && (0.0..=1.0).contains(&v) => Some(v as f32),
                _ => bail!(
                    "line {line}: `confidence` is {}; it must be a probability in [0, 1] on every row",
                    shown(text)
                ),
            },
        };
        if let Some((first, ..)) = rows[image] {
            bail!(
                "line {line}: `path` {} names the same image as line {first} ({}); give each image one row",
                shown(&path),
                dataset.images[image].path.display()
            );
        }
        rows[image] = Some((line, class, confidence));
    }

    let mut predicted = Vec::with_capacity(rows.len());
    let mut confidence = Vec::with_capacity(rows.len());
    for (img, row) in dataset.images.iter().zip(rows) {
        let Some((_, class, c)) = row else {
            let file = img.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
            bail!(
                "{} has no row; add `{}/{file},<predicted class>` to the file",
                img.path.display(),
                dataset.classes[img.class]
            );
        };
        predicted.push(class);
        confidence.push(c);
    }
    let confidence = confidence.into_iter().collect::<Option<Vec<f32>>>();
    Ok((predicted, confidence))
}

/// A path as written by any tool: `\` as `/`, no leading `./`, composed (NFC).
fn normalise(path: &str) -> String {
    let path = path.replace('\\', "/");
    nfc(path.trim_start_matches("./"))
}

/// `text` in Unicode normalisation form C, the form names are compared in.
fn nfc(text: &str) -> String {
    text.nfc().collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::calibrate::dataset::{LabelledImage, Part};

    /// Two classes, images `a/1.png`, `a/2.png`, `b/1.png` under root `data`.
    fn dataset() -> Dataset {
        let image = |class: usize, file: &str| LabelledImage {
            path: PathBuf::from(format!("/x/data/{}/{file}", ["a", "b"][class])),
            class,
            part: Part::Fit,
            size: 1,
        };
        Dataset {
            classes: vec!["a".into(), "b".into()],
            images: vec![image(0, "1.png"), image(0, "2.png"), image(1, "1.png")],
            ignored: vec![],
        }
    }

    #[test]
    fn rows_match_images_in_any_order_and_column_order() {
        let csv = "Confidence,label,PATH,predicted\n0.9,a,b/1.png,b\n0.25,a,./a/2.png,b\n1,a,a\\1.png,a\n";
        let (predicted, confidence) = parse(csv.as_bytes(), &dataset()).unwrap();
        assert_eq!(predicted, vec![0, 1, 1]);
        assert_eq!(confidence, Some(vec![1.0, 0.25, 0.9]));
        let bom = "\u{feff}path,predicted\na/1.png,a\na/2.png,a\ndata/b/1.png,a\n";
        assert_eq!(parse(bom.as_bytes(), &dataset()).unwrap(), (vec![0, 0, 0], None));
    }

    #[test]
    fn every_mismatch_names_its_line() {
        let err = |csv: &str| parse(csv.as_bytes(), &dataset()).unwrap_err().to_string();
        assert!(err("path,predicted\na/1.png,a\na/2.png,a\n").contains("b/1.png has no row"));
        assert!(err("path,predicted\na/1.png,a\na/2.png,a\nb/1.png,b\nb/9.png,b\n").starts_with("line 5: no image"));
        assert!(err("path,predicted\na/1.png,a\na/2.png,c\nb/1.png,b\n").starts_with("line 3: `predicted` is \"c\""));
        assert!(err("path,predicted\na/1.png,a\na/1.png,b\n").contains("same image as line 2"));
        assert!(
            err("path,predicted\na/1.png,a\ndata/a/1.png,a\n")
                .starts_with("line 3: `path` \"data/a/1.png\" names the same image as line 2")
        );
        assert!(err("path,predicted,Predicted\na/1.png,a,b\n").contains("`predicted` more than once"));
        assert!(err("path,predicted\na/1.png,a\na/2.png,a,x\n").starts_with("line 3: malformed CSV"));
        let long = "x".repeat(100_000);
        assert!(err(&format!("path,predicted\n{long},a\n")).len() < 400, "a huge field is not echoed whole");
        assert!(err("path,predicted,confidence\na/1.png,a,1.5\n").starts_with("line 2: `confidence`"));
        assert!(err("path,predicted,confidence\na/1.png,a,\n").starts_with("line 2: `confidence`"));
        assert!(err("file,class\na/1.png,a\n").contains("must name the columns `path` and `predicted`"));
        assert!(err("path,predicted\na/1.png\n").starts_with("line 2: malformed CSV"));
    }

    /// With two roots holding the same `<class>/<file>`, a short path would pair rows by
    /// guesswork: the root's name is required, and then both match.
    #[test]
    fn two_roots_need_the_root_only_when_they_collide() {
        let mut ds = dataset();
        ds.images.push(LabelledImage { path: PathBuf::from("/x/held/a/1.png"), class: 0, part: Part::Test, size: 1 });
        let short = "path,predicted\na/1.png,a\na/2.png,a\nb/1.png,b\nheld/a/1.png,b\n";
        assert!(parse(short.as_bytes(), &ds).unwrap_err().to_string().contains("start it with the root folder's name"));
        let long = "path,predicted\ndata/a/1.png,a\na/2.png,a\nb/1.png,b\nheld/a/1.png,b\n";
        assert_eq!(parse(long.as_bytes(), &ds).unwrap().0, vec![0, 0, 1, 1]);
    }

    /// A class folder and a file named with "é" composed (U+00E9, as Linux tools write it)
    /// match a CSV that spells both decomposed ("e" + U+0301, as macOS's file system does), and
    /// the other way round: the two look identical in every message.
    #[test]
    fn composed_and_decomposed_names_match() {
        let (composed, decomposed) = ("Caf\u{e9}", "Cafe\u{301}");
        let image = |class: usize, file: &str| LabelledImage {
            path: PathBuf::from(format!("/x/data/{}/{file}", [composed, "b"][class])),
            class,
            part: Part::Fit,
            size: 1,
        };
        let ds = Dataset {
            classes: vec![composed.into(), "b".into()],
            images: vec![image(0, &format!("{composed}.png")), image(1, "1.png")],
            ignored: vec![],
        };
        let csv = format!("path,predicted\n{decomposed}/{decomposed}.png,b\nb/1.png,{decomposed}\n");
        assert_eq!(parse(csv.as_bytes(), &ds).unwrap().0, vec![1, 0]);
        let mut nfd = ds.clone();
        nfd.classes[0] = decomposed.into();
        nfd.images[0].path = PathBuf::from(format!("/x/data/{decomposed}/{decomposed}.png"));
        let csv = format!("path,predicted\n{composed}/{composed}.png,{composed}\nb/1.png,b\n");
        assert_eq!(parse(csv.as_bytes(), &nfd).unwrap().0, vec![0, 1]);
    }
}
