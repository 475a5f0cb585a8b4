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

use std::{
    collections::{HashMap, hash_map::Entry},
    path::Path,
};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

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

/// One row as read: its line in the file, the predicted class and the confidence.
struct Row {
    line: u64,
    class: usize,
    confidence: Option<f32>,
}

/// Reads `file` and matches its rows to `dataset`'s images.
pub fn read(file: &Path, dataset: &Dataset) -> anyhow::Result<Predictions> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read --predictions {}", file.display()))?;
    let sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let (predicted, confidence) = parse(&bytes, dataset).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(Predictions { predicted, confidence, sha256 })
}

/// The CSV's rows matched to `dataset`'s images: the predicted class of each image and, when
/// the file has a `confidence` column, each image's confidence.
fn parse(bytes: &[u8], dataset: &Dataset) -> anyhow::Result<(Vec<usize>, Option<Vec<f32>>)> {
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(false).from_reader(bytes);
    let header = reader.headers().context("cannot read the CSV header")?.clone();
    let column = |name: &str| header.iter().position(|h| h.trim_start_matches('\u{feff}').eq_ignore_ascii_case(name));
    let (Some(path_col), Some(predicted_col)) = (column("path"), column("predicted")) else {
        bail!(
            "the header must name the columns `path` and `predicted` (and optionally `confidence`); it has: {}",
            header.iter().collect::<Vec<_>>().join(", ")
        );
    };
    let confidence_col = column("confidence");
    let class_of: HashMap<&str, usize> = dataset.classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();

    let mut rows: HashMap<String, Row> = HashMap::new();
    for record in reader.records() {
        let record = record.context("malformed CSV")?;
        let line = record.position().map_or(0, csv::Position::line);
        let path = normalise(&record[path_col]);
        if path.is_empty() {
            bail!("line {line}: `path` is empty");
        }
        let predicted = &record[predicted_col];
        let Some(&class) = class_of.get(predicted) else {
            bail!(
                "line {line}: `predicted` is {predicted:?}, which is not a class folder; the classes are: {}",
                dataset.classes.join(", ")
            );
        };
        let confidence = match confidence_col.map(|c| &record[c]) {
            None => None,
            Some(text) => match text.parse::<f64>() {
                Ok(v) if v.is_finite() && (0.0..=1.0).contains(&v) => Some(v as f32),
                _ => bail!("line {line}: `confidence` is {text:?}; it must be a probability in [0, 1] on every row"),
            },
        };
        match rows.entry(path) {
            Entry::Occupied(first) => {
                bail!(
                    "line {line}: `path` {:?} is also on line {}; give each image one row",
                    first.key(),
                    first.get().line
                )
            }
            Entry::Vacant(slot) => {
                slot.insert(Row { line, class, confidence });
            }
        }
    }

    // An image's keys: `<class>/<file>`, and `<root>/<class>/<file>` naming its root folder.
    let keys: Vec<(String, Option<String>)> = dataset
        .images
        .iter()
        .map(|img| {
            let file = img.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
            let short = format!("{}/{file}", dataset.classes[img.class]);
            let root = img.path.parent().and_then(Path::parent).and_then(Path::file_name);
            let long = root.map(|r| format!("{}/{short}", r.to_string_lossy()));
            (short, long)
        })
        .collect();
    let mut short_count: HashMap<&str, usize> = HashMap::new();
    for (short, _) in &keys {
        *short_count.entry(short.as_str()).or_default() += 1;
    }

    let mut predicted = Vec::with_capacity(keys.len());
    let mut confidence = Vec::with_capacity(keys.len());
    for (img, (short, long)) in dataset.images.iter().zip(&keys) {
        let row = match long.as_ref().and_then(|l| rows.remove(l)) {
            Some(row) => row,
            None if short_count[short.as_str()] > 1 => bail!(
                "{} and another root both hold `{short}`; name the root in `path` ({})",
                img.path.display(),
                long.as_deref().unwrap_or("<root>/<class>/<file>")
            ),
            None => rows.remove(short).with_context(|| {
                format!("{} has no row; add `{short},<predicted class>` to the file", img.path.display())
            })?,
        };
        predicted.push(row.class);
        confidence.push(row.confidence);
    }
    if let Some((path, row)) = rows.iter().min_by_key(|(_, r)| r.line) {
        bail!(
            "line {}: no image at `path` {path:?} ({} rows in all match no image); paths are <class>/<file> under the dataset root",
            row.line,
            rows.len()
        );
    }
    let confidence = confidence.into_iter().collect::<Option<Vec<f32>>>();
    Ok((predicted, confidence))
}

/// A path as written by any tool: `\` as `/`, no leading `./`.
fn normalise(path: &str) -> String {
    let path = path.replace('\\', "/");
    path.trim_start_matches("./").to_owned()
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
        assert!(err("path,predicted\na/1.png,a\na/1.png,b\n").contains("also on line 2"));
        assert!(err("path,predicted,confidence\na/1.png,a,1.5\n").starts_with("line 2: `confidence`"));
        assert!(err("path,predicted,confidence\na/1.png,a,\n").starts_with("line 2: `confidence`"));
        assert!(err("file,class\na/1.png,a\n").contains("must name the columns `path` and `predicted`"));
        assert!(err("path,predicted\na/1.png\n").contains("malformed CSV"));
    }

    /// With two roots holding the same `<class>/<file>`, a short path would pair rows by
    /// guesswork: the root's name is required, and then both match.
    #[test]
    fn two_roots_need_the_root_only_when_they_collide() {
        let mut ds = dataset();
        ds.images.push(LabelledImage { path: PathBuf::from("/x/held/a/1.png"), class: 0, part: Part::Test, size: 1 });
        let short = "path,predicted\na/1.png,a\na/2.png,a\nb/1.png,b\nheld/a/1.png,b\n";
        assert!(parse(short.as_bytes(), &ds).unwrap_err().to_string().contains("name the root"));
        let long = "path,predicted\ndata/a/1.png,a\na/2.png,a\nb/1.png,b\nheld/a/1.png,b\n";
        assert_eq!(parse(long.as_bytes(), &ds).unwrap().0, vec![0, 0, 1, 1]);
    }
}
