//! `qscore calibrate --export-split DIR`: the split's rows as NumPy files, so that another
//! implementation of the probe (scikit-learn, `models/recipes/sklearn_probe.py`) can be fitted
//! on exactly the rows the Rust probe was fitted on and compared with it image by image.
//!
//! Files, one set per part (fit, select, test), rows in the order calibration saw them:
//! - `{part}_h.npy`: the representations, float32, shape (n, d).
//! - `{part}_y.npy`: the labels, int64, shape (n,), indices into `split.json`'s `classes`.
//! - `{part}_pred.npy`: the Rust probe's predicted class, int64, shape (n,).
//!
//! and `split.json`: the model, the classes, the probe's settings, the row counts and the Rust
//! probe's accuracy per part. Writing the .npy format (version 1.0) by hand keeps it a
//! dependency-free 20 lines: a magic string, a Python-dict header padded to 64 bytes, raw
//! little-endian values.

use std::{io::Write as _, path::Path};

use anyhow::Context;
use ndarray::Axis;

use super::{dataset::Part, fit::Embedded};
use crate::model::calibration::Calibration;

/// Writes the split of `data` and `calibration`'s probe predictions under `dir` (created).
pub fn write(dir: &Path, data: &Embedded, calibration: &Calibration) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut summary = serde_json::Map::new();
    for (part, name) in [(Part::Fit, "fit"), (Part::Select, "select"), (Part::Test, "test")] {
        let rows: Vec<usize> = (0..data.parts.len()).filter(|&i| data.parts[i] == part).collect();
        let h = data.h.select(Axis(0), &rows);
        let y: Vec<i64> = rows.iter().map(|&i| data.labels[i] as i64).collect();
        let pred: Vec<i64> = h.axis_iter(Axis(0)).map(|r| calibration.probe.predict(r).class as i64).collect();
        let right = y.iter().zip(&pred).filter(|(a, b)| a == b).count();
        let values: Vec<f32> = h.iter().copied().collect();
        save(&dir.join(format!("{name}_h.npy")), "<f4", &[rows.len(), h.ncols()], &le_bytes(&values))?;
        save(&dir.join(format!("{name}_y.npy")), "<i8", &[rows.len()], &le_bytes(&y))?;
        save(&dir.join(format!("{name}_pred.npy")), "<i8", &[rows.len()], &le_bytes(&pred))?;
        summary.insert(
            name.into(),
            serde_json::json!({"rows": rows.len(), "rust_probe_accuracy": right as f64 / rows.len().max(1) as f64}),
        );
    }
    let split = serde_json::json!({
        "model": calibration.model,
        "classes": calibration.probe.classes,
        "probe_alpha": calibration.probe.alpha,
        "standardisation": "per-feature mean and population sd of the fit rows (sd 0 -> 1)",
        "parts": summary,
        "files": "{fit,select,test}_h.npy float32 (n, d); {part}_y.npy int64 labels; {part}_pred.npy int64 Rust probe classes",
    });
    std::fs::write(dir.join("split.json"), serde_json::to_string_pretty(&split)? + "\n")
        .with_context(|| format!("cannot write {}/split.json", dir.display()))
}

/// Little-endian bytes of a slice of numbers.
fn le_bytes<T: ToLe>(values: &[T]) -> Vec<u8> {
    values.iter().flat_map(ToLe::to_le).collect()
}

trait ToLe {
    fn to_le(&self) -> Vec<u8>;
}
impl ToLe for f32 {
    fn to_le(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}
impl ToLe for i64 {
    fn to_le(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

/// The .npy (version 1.0) header for a C-ordered array of `descr` (e.g. "<f4") and `shape`.
fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + dict + '\n' must be a multiple of 64.
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.into_bytes());
    out
}

fn save(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(&header(descr, shape))?;
    file.write_all(data).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dict "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }" is 59 bytes; with
    /// the 10-byte preamble and the newline that is 70, so 58 spaces pad it to 128.
    #[test]
    fn npy_header_is_numpy_s() {
        let h = header("<f4", &[2, 3]);
        assert_eq!(h.len(), 128);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 118);
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(text.ends_with(" \n"));
        assert!(std::str::from_utf8(&header("<i8", &[5])[10..]).unwrap().contains("'shape': (5,), }"));
        assert_eq!(le_bytes(&[1.0_f32]), vec![0, 0, 0x80, 0x3f]);
        assert_eq!(le_bytes(&[-1_i64]), vec![0xff; 8]);
    }
}
