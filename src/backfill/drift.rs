//! `qscore drift`: a finished backfill's drift from its model's calibration reference.
//!
//! The shards are read row by row into one [`Tally`], the same one a live window fills, so the
//! figures are those `GET /v1/drift` would answer had the same images been posted. Failed rows
//! are counted and left out of every statistic, as the live window leaves out failed requests.
//! Rows scored by another model or another calibration compare with a reference that is not
//! theirs: they are an error naming the file, never averaged in. The embedding test needs the
//! representations, which a backfill does not store: it answers `not_stored`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;

use super::table;
use crate::{
    drift::{DriftReport, EmbeddingDrift, Tally},
    model::{calibration::Calibration, manifest::Manifest},
};

/// What `qscore drift` prints: `/v1/drift`'s shape, and what was read.
#[derive(Debug, Serialize)]
pub struct BackfillDrift {
    /// One report: the reference model's.
    pub models: Vec<DriftReport>,
    /// The rows behind it.
    pub backfill: Counts,
}

/// Rows read from the backfill's files.
#[derive(Debug, Default, Serialize)]
pub struct Counts {
    /// Files read.
    pub files: usize,
    /// Rows read.
    pub rows: u64,
    /// Rows with a score: the report's `window_images`.
    pub scored: u64,
    /// Rows with an error, counted and left out.
    pub failed: u64,
}

/// Refuses `scores` unless they are distinct shards of one backfill: the same file twice, two
/// files of one shard, or shards of different manifests (or of different shard counts) would
/// count images twice or mix two collections into one distribution.
fn check_one_backfill(scores: &[PathBuf]) -> anyhow::Result<()> {
    let mut seen: Vec<(&PathBuf, table::Identity)> = Vec::new();
    for path in scores {
        let id = table::read_identity(path)?;
        for (other, known) in &seen {
            let (a, b) = (other.display(), path.display());
            if crate::regular_file::same(other, path) {
                bail!("{a} and {b} are the same file; give each shard once");
            }
            if known.manifest_sha256 != id.manifest_sha256 || known.shard.count != id.shard.count {
                bail!(
                    "{a} is shard {} of manifest sha256 {:.12} but {b} is shard {} of manifest sha256 {:.12}: they are \
                     different backfills; compare each backfill on its own",
                    known.shard,
                    known.manifest_sha256,
                    id.shard,
                    id.manifest_sha256
                );
            }
            if known.shard == id.shard {
                bail!("{a} and {b} both hold shard {} of the same manifest; give each shard once", id.shard);
            }
        }
        seen.push((path, id));
    }
    Ok(())
}

/// The drift of the rows in `scores` from the calibration of `reference` under `models_dir`.
pub fn compare(models_dir: &Path, reference: &str, scores: &[PathBuf]) -> anyhow::Result<BackfillDrift> {
    let dir = models_dir.join(reference);
    let manifest = Manifest::load(&dir).with_context(|| {
        format!("no model `{reference}` under {}; check --reference and --models-dir", models_dir.display())
    })?;
    let Some(cal) = Calibration::load(&dir, manifest.output.dim)? else {
        bail!(
            "model `{reference}` has no calibration.json, so there is no reference distribution to compare with; run \
             `qscore calibrate --model {reference}`"
        );
    };
    check_one_backfill(scores)?;
    let mut tally = Tally::default();
    let mut counts = Counts::default();
    for path in scores {
        counts.files += 1;
        let promised = table::read_identity(path)?.rows;
        let mut read = 0_u64;
        table::read_rows(path, |row| {
            read += 1;
            if row.model != manifest.name {
                bail!(
                    "{}: rows scored by model `{}`, not the reference `{}`; pass --reference {} or leave the file out",
                    path.display(),
                    row.model,
                    manifest.name,
                    row.model
                );
            }
            if row.calibration_sha256.as_deref() != Some(cal.sha256.as_str()) {
                bail!(
                    "{}: rows scored with calibration sha256 {}, but {}/calibration.json has sha256 {}; re-score the \
                     backfill with this calibration, or compare it with the calibration it was scored with",
                    path.display(),
                    row.calibration_sha256.as_deref().unwrap_or("none (uncalibrated)"),
                    dir.display(),
                    cal.sha256
                );
            }
            counts.rows += 1;
            match (row.error_code, row.q_score) {
                (None, Some(q)) => {
                    counts.scored += 1;
                    tally.add(q, row.p_misclassified, row.likely_misclassified == Some(true), row.features);
                }
                _ => counts.failed += 1,
            }
            Ok(())
        })?;
        if read != promised {
            bail!(
                "{}: its footer promises {promised} rows but it holds {read}: the shard was cut or rewritten; delete \
                 it and score its shard again",
                path.display()
            );
        }
    }
    let report = if tally.is_empty() {
        DriftReport::empty(
            manifest.name.clone(),
            crate::drift::DriftStatus::EmptyWindow,
            format!("no scored row in the {} rows of --scores", counts.rows),
            cal.reference.images,
            None,
            EmbeddingDrift::not_stored(&cal),
        )
    } else {
        let embedding = EmbeddingDrift::not_stored(&cal);
        let mut r = tally.report(manifest.name.clone(), &cal, 0.0, embedding);
        r.message = "the backfill's scored rows compared with the calibration reference".into();
        r
    };
    Ok(BackfillDrift { models: vec![report], backfill: counts })
}
