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
//! already answers the same five reads every row back ([`table::verify`]: each column decodes,
//! the `line` values are the shard's, in order) and skips the shard without scoring, unless a
//! row failed for a reason a rerun may change ([`crate::error::RETRYABLE_CODES`]: a fetch
//! failure, a refused URL, a missing file, the engine busy): then the whole shard is scored
//! again. Rows that failed because the image itself is bad (undecodable, too large) are data and
//! stay. One whose `--out` answers something else is an error (delete it, choose another
//! `--out`, or pass `--force`), because silently replacing a finished shard of another model or
//! manifest loses work, and silently keeping it mixes two backfills; so is an `--out` that is not
//! Parquet at all (it does not start with `PAR1`: someone's file). An `--out` that starts with
//! `PAR1` but is unreadable, or whose rows do not check out, is our unfinished or damaged shard
//! and is scored again; `--out` naming the manifest itself is always refused.
//!
//! Exit status: 1 while any row has a failure a rerun may change, so a Kubernetes Indexed Job
//! retries the index; 0 when every row is scored or failed for good. So the Job can retry any
//! index, or be rerun whole after a failure, and only the unfinished shards do work.
//!
//! `qscore drift --reference MODEL --scores FILES...` ([`drift`]) reads the shards back and
//! answers the statistics `GET /v1/drift` answers for live traffic, through the same
//! [`crate::drift::Tally`].

pub mod drift;
pub mod fetch;
pub mod manifest;
pub mod table;

use std::{collections::BTreeMap, io::IsTerminal, path::Path, sync::Arc};

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
pub struct ShardOutcome {
    /// `--out` already held the finished shard with no failure a rerun may change; nothing was
    /// scored.
    pub skipped: bool,
    /// Rows in the file.
    pub rows: u64,
    /// Rows that carry an error.
    pub failed: u64,
    /// Failed rows by error code, for the codes a rerun may change.
    pub retryable: BTreeMap<String, u64>,
}

impl ShardOutcome {
    /// Rows whose failure a rerun may change: when not 0, the shard is not done.
    pub fn retryable_rows(&self) -> u64 {
        self.retryable.values().sum()
    }
}

/// `code: count, ...` for a person.
pub fn by_code(counts: &BTreeMap<String, u64>) -> String {
    counts.iter().map(|(code, n)| format!("{code}: {n}")).collect::<Vec<_>>().join(", ")
}

/// Scores `shard` of `manifest` into the Parquet file `out`, unless it already holds exactly
/// that with no failure a rerun may change (see the module docs for resume and `force`).
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
    let shown = out.display();
    // Not a file at all (a FIFO, a device, a folder): nothing --force could replace.
    if std::fs::metadata(out).is_ok_and(|m| !m.is_file()) {
        bail!(
            "--out {shown} exists and is not a regular file (a folder, FIFO or device); give --out the path of a new file, or of a shard to resume"
        );
    }
    match table::inspect(out) {
        Existing::Missing => {}
        Existing::Unfinished(why) => {
            eprintln!("qscore: {shown} is not a finished shard ({why}); scoring shard {shard} again");
        }
        Existing::Finished(found) if found == identity => {
            let lines: Vec<u64> = entries.iter().map(|e| e.line).collect();
            match table::verify(out, &lines) {
                Ok(v) if v.retryable_rows() == 0 => {
                    eprintln!(
                        "qscore: skipped shard {shard}: {shown} already holds its {} rows ({} failed for reasons a \
                         rerun does not change) for manifest sha256 {:.12}, model {} {}",
                        found.rows, v.failed, found.manifest_sha256, found.model, found.model_version
                    );
                    return Ok(ShardOutcome {
                        skipped: true,
                        rows: found.rows,
                        failed: v.failed,
                        retryable: v.retryable,
                    });
                }
                Ok(v) => eprintln!(
                    "qscore: {shown}: {} rows failed for reasons a rerun may change ({}); scoring shard {shard} again",
                    v.retryable_rows(),
                    by_code(&v.retryable)
                ),
                Err(why) => eprintln!(
                    "qscore: {shown} claims to be shard {shard} but its rows do not check out ({why}); scoring it again"
                ),
            }
        }
        Existing::Finished(_) | Existing::Foreign | Existing::NotShard(_) if force => {}
        Existing::Finished(found) => {
            return refuse(format!("holds another backfill: {}", found.differences(&identity).join(", ")));
        }
        Existing::Foreign => return refuse("is a Parquet file but not a qscore backfill shard".into()),
        Existing::NotShard(what) => return refuse(format!("exists and is not a qscore shard: it {what}")),
    }
    // Shards of one Job share a folder that the first of them may have to make.
    if let Some(folder) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}, the folder of --out", folder.display()))?;
    }
    let mut file = AtomicFile::create(out)?;
    let mut writer = ShardWriter::new(file.file().try_clone()?, identity)?;
    let mut outcome = ShardOutcome { skipped: false, rows: 0, failed: 0, retryable: BTreeMap::new() };
    score_entries(engine, model, &entries, sources, |entry, answer| {
        outcome.rows += 1;
        if let Err(e) = &answer {
            outcome.failed += 1;
            if crate::error::is_retryable(&e.code) {
                *outcome.retryable.entry(e.code.clone()).or_default() += 1;
            }
        }
        writer.push(entry.line, &entry.text, answer.as_ref())
    })
    .await?;
    drop(writer.finish()?);
    file.commit()?;
    Ok(outcome)
}
