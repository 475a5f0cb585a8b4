//! Backfills: scoring a manifest of images offline, in shards that resume, and the drift of
//! the result.
//!
//! `qscore score --manifest FILE [--shard I/N] --format parquet --out FILE` scores the entries
//! of one shard ([`manifest`]) through the same engine as the server, reading local files and
//! fetching URLs from allowed hosts ([`fetch`]), and writes one Parquet row per entry, scored or
//! failed ([`table`]). Nothing is dropped: the file has exactly as many rows as the shard has
//! entries, or it is not written.
//!
//! Resume: the file is written atomically and says in its metadata which manifest (SHA-256),
//! shard, model, model version and calibration (SHA-256) it answers. A rerun whose `--out`
//! already answers the same five skips the shard without scoring; one that answers something
//! else is an error (delete it, choose another `--out`, or pass `--force`), because silently
//! replacing a finished shard of another model or manifest loses work, and silently keeping it
//! mixes two backfills. An unreadable or truncated `--out` is not finished and is scored again.
//! So a Kubernetes Indexed Job can retry any index, or rerun the whole job after a failure, and
//! only the unfinished shards do work.
//!
//! `qscore drift --reference MODEL --scores FILES...` ([`drift`]) reads the shards back and
//! answers the statistics `GET /v1/drift` answers for live traffic, through the same
//! [`crate::drift::Tally`].

pub mod drift;
pub mod fetch;
pub mod manifest;
pub mod table;

use std::{io::IsTerminal, path::Path, sync::Arc};

use anyhow::{Context, bail};

use self::{
    fetch::Sources,
    manifest::{Entry, Manifest, Shard},
    table::{Existing, Identity, ShardWriter},
};
use crate::{
    atomic_file::AtomicFile,
    engine::{EmbeddingMode, Engine, ImageScore, Input, Model},
    error::ErrorDetail,
};

/// Entries read and scored at once. Their bytes are held together (this chunk's while the
/// next one is being read), so the most held is `2 × CHUNK × --max-image-bytes`.
pub const CHUNK: usize = 32;

/// Scores `entries` with `model`, in order, calling `emit` with each entry's answer or error.
/// The next chunk's files and URLs are read while this one is scored.
pub async fn score_entries(
    engine: &Engine,
    model: &Arc<Model>,
    entries: &[&Entry],
    sources: &Sources,
    mut emit: impl FnMut(&Entry, Result<ImageScore, ErrorDetail>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(entries.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
                .expect("a valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message(format!("scoring with {}", model.name()));
    async fn load(sources: &Sources, chunk: &[&Entry]) -> Vec<Input> {
        let loads = chunk.iter().map(|e| async move { Input::new(e.text.clone(), sources.load(&e.text).await) });
        futures_util::future::join_all(loads).await
    }
    let chunks: Vec<&[&Entry]> = entries.chunks(CHUNK).collect();
    let mut inputs = match chunks.first() {
        Some(c) => load(sources, c).await,
        None => Vec::new(),
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let next = chunks.get(i + 1).copied().unwrap_or_default();
        let (scored, next_inputs) =
            tokio::join!(engine.score(model, std::mem::take(&mut inputs), EmbeddingMode::Omit), load(sources, next));
        // A whole-call error (the engine stopped) says nothing about the images: stop here, and
        // the shard is not written, so a rerun scores it again.
        let scored = scored.map_err(|e| anyhow::anyhow!("scoring stopped: {e}"))?;
        for (entry, out) in chunk.iter().zip(scored) {
            emit(entry, out.answer.map_err(|e| ErrorDetail::from(&e)))?;
        }
        bar.inc(chunk.len() as u64);
        inputs = next_inputs;
    }
    bar.finish_and_clear();
    Ok(())
}

/// What [`write_shard`] did.
#[derive(Debug)]
pub enum ShardOutcome {
    /// `--out` already held the finished shard; nothing was scored.
    Skipped,
    /// The shard was scored and written: its rows, and how many of them failed.
    Written {
        /// Rows written.
        rows: u64,
        /// Rows that carry an error.
        failed: u64,
    },
}

/// Scores `shard` of `manifest` into the Parquet file `out`, unless it already holds exactly
/// that (see the module docs for resume and `force`).
pub async fn write_shard(
    engine: &Engine,
    model: &Arc<Model>,
    manifest: &Manifest,
    shard: Shard,
    sources: &Sources,
    out: &Path,
    force: bool,
) -> anyhow::Result<ShardOutcome> {
    let entries = manifest.shard(shard);
    let identity = Identity {
        manifest_sha256: manifest.sha256.clone(),
        shard,
        model: model.name().to_owned(),
        model_version: model.manifest.version.clone(),
        calibration_sha256: model.calibration.as_ref().map(|c| c.sha256.clone()),
        rows: entries.len() as u64,
    };
    let refuse = |what: String| -> anyhow::Result<ShardOutcome> {
        bail!("{} {what}; delete it, choose another --out, or pass --force to overwrite it", out.display())
    };
    match table::inspect(out) {
        Existing::Missing => {}
        Existing::Unreadable(why) => {
            eprintln!("qscore: {} is not a finished shard ({why}); scoring shard {shard} again", out.display());
        }
        Existing::Finished(found) if found == identity => {
            eprintln!(
                "qscore: skipped shard {shard}: {} already holds its {} rows for manifest sha256 {:.12}, model {} {}",
                out.display(),
                found.rows,
                found.manifest_sha256,
                found.model,
                found.model_version
            );
            return Ok(ShardOutcome::Skipped);
        }
        Existing::Finished(_) | Existing::Foreign if force => {}
        Existing::Finished(found) => {
            return refuse(format!("holds another backfill: {}", found.differences(&identity).join(", ")));
        }
        Existing::Foreign => return refuse("is a Parquet file but not a qscore backfill shard".into()),
    }
    // Shards of one Job share a folder that the first of them may have to make.
    if let Some(folder) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}, the folder of --out", folder.display()))?;
    }
    let mut file = AtomicFile::create(out)?;
    let mut writer = ShardWriter::new(file.file().try_clone()?, identity)?;
    let (mut rows, mut failed) = (0, 0);
    score_entries(engine, model, &entries, sources, |entry, answer| {
        rows += 1;
        failed += u64::from(answer.is_err());
        writer.push(entry.line, &entry.text, answer.as_ref())
    })
    .await?;
    drop(writer.finish()?);
    file.commit()?;
    Ok(ShardOutcome::Written { rows, failed })
}
