//! The Parquet file of one backfill shard: one row per manifest entry, scored or failed.
//!
//! Columns are flat, so any Parquet reader (pyarrow, DuckDB, Spark, pandas) reads them without
//! a schema of ours:
//!
//! | column | type | null when |
//! |---|---|---|
//! | `line` | int64 | never: the entry's line in the manifest, from 1 |
//! | `input` | string | never: the path or URL as the manifest wrote it |
//! | `model`, `model_version` | string | never |
//! | `calibration_sha256` | string | the model is uncalibrated |
//! | `calibrated` | boolean | never |
//! | `q_score` | float | the entry failed |
//! | `likely_misclassified` | boolean | failed, or uncalibrated |
//! | `p_misclassified` | float | failed, or uncalibrated |
//! | `risk_source` | string | failed, or uncalibrated |
//! | `predicted_class`, `class_probability` | string, float | failed, or no classifier |
//! | `risk` | double | failed: `qscore score`'s riskiest-first key |
//! | `mu`, `sigma`, `z_max`, `q_v1`, `l2_norm` | float | failed: the answer's `stats` |
//! | `active`, `active_discriminative`, `dim` | int32 | failed |
//! | `discriminative_features` | string | failed: the answer's list of L ∩ D as JSON, `[{"index", "activation", "z_score"}]`, strongest first |
//! | `error_code`, `error_message` | string | the entry was scored |
//!
//! `discriminative_features` is a JSON string rather than a Parquet list: the list varies in
//! length and in fields with the API, and every engine parses JSON columns, where nested
//! Parquet types still trip some readers. Timings are left out: they describe the run, not the
//! image.
//!
//! The key-value metadata says what the file is the complete answer to (keys under `qscore.`):
//! the manifest's SHA-256, the shard, the model, its version, the calibration's SHA-256 and the
//! row count. The file is written whole or not at all ([`crate::atomic_file`]), so a file that
//! parses and carries them is a finished shard.

use std::{collections::BTreeMap, fs::File, path::Path, sync::Arc};

use anyhow::{Context, bail};
use parquet::{
    basic::Compression,
    data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type},
    file::{
        metadata::KeyValue,
        properties::WriterProperties,
        reader::{FileReader, SerializedFileReader},
        writer::{SerializedFileWriter, SerializedRowGroupWriter},
    },
    record::Field,
    schema::parser::parse_message_type,
};

use super::manifest::Shard;
use crate::{engine::ImageScore, error::ErrorDetail};

/// What the file format is, so a reader tells a backfill from any other Parquet file.
pub const FORMAT: &str = "qscore-backfill/1";

/// Rows buffered before a row group is written: bounds the writer's memory (about 1 KiB a row)
/// whatever the shard's size.
pub const ROW_GROUP_ROWS: usize = 8192;

const SCHEMA: &str = "
message qscore_backfill {
  required int64 line;
  required binary input (STRING);
  required binary model (STRING);
  required binary model_version (STRING);
  optional binary calibration_sha256 (STRING);
  required boolean calibrated;
  optional float q_score;
  optional boolean likely_misclassified;
  optional float p_misclassified;
  optional binary risk_source (STRING);
  optional binary predicted_class (STRING);
  optional float class_probability;
  optional double risk;
  optional float mu;
  optional float sigma;
  optional float z_max;
  optional float q_v1;
  optional float l2_norm;
  optional int32 active;
  optional int32 active_discriminative;
  optional int32 dim;
  optional binary discriminative_features (STRING);
  optional binary error_code (STRING);
  optional binary error_message (STRING);
}";

/// What a shard file is the complete answer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// SHA-256 of the manifest.
    pub manifest_sha256: String,
    /// The shard of it.
    pub shard: Shard,
    /// The model's name.
    pub model: String,
    /// The model's version (model.toml).
    pub model_version: String,
    /// SHA-256 of its calibration.json; None when uncalibrated.
    pub calibration_sha256: Option<String>,
    /// Rows: the shard's entries.
    pub rows: u64,
}

impl Identity {
    fn key_values(&self) -> Vec<KeyValue> {
        let kv = |k: &str, v: String| KeyValue::new(format!("qscore.{k}"), v);
        vec![
            kv("format", FORMAT.into()),
            kv("manifest_sha256", self.manifest_sha256.clone()),
            kv("shard", self.shard.to_string()),
            kv("model", self.model.clone()),
            kv("model_version", self.model_version.clone()),
            kv("calibration_sha256", self.calibration_sha256.clone().unwrap_or_default()),
            kv("rows", self.rows.to_string()),
            kv("qscore_version", env!("CARGO_PKG_VERSION").into()),
        ]
    }

    /// Reads the identity a file's metadata claims; None when it is not a backfill file.
    fn from_key_values(kv: &BTreeMap<String, String>) -> Option<Self> {
        let get = |k: &str| kv.get(&format!("qscore.{k}")).cloned();
        if get("format").as_deref() != Some(FORMAT) {
            return None;
        }
        Some(Self {
            manifest_sha256: get("manifest_sha256")?,
            shard: get("shard")?.parse().ok()?,
            model: get("model")?,
            model_version: get("model_version")?,
            calibration_sha256: get("calibration_sha256").filter(|s| !s.is_empty()),
            rows: get("rows")?.parse().ok()?,
        })
    }

    /// How `self` differs from `other`, for a person.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |what: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{what} {a} (wanted {b})"));
            }
        };
        cmp("manifest sha256", self.manifest_sha256.clone(), other.manifest_sha256.clone());
        cmp("shard", self.shard.to_string(), other.shard.to_string());
        cmp("model", self.model.clone(), other.model.clone());
        cmp("model version", self.model_version.clone(), other.model_version.clone());
        let cal = |c: &Option<String>| c.clone().unwrap_or_else(|| "none".into());
        cmp("calibration sha256", cal(&self.calibration_sha256), cal(&other.calibration_sha256));
        cmp("rows", self.rows.to_string(), other.rows.to_string());
        out
    }
}

/// What an existing `--out` holds.
#[derive(Debug)]
pub enum Existing {
    /// Nothing there.
    Missing,
    /// Our own unfinished file: empty, or starting with Parquet's magic `PAR1` but not readable
    /// as Parquet (truncated, or the footer lost): why. Scored again.
    Unfinished(String),
    /// Something that is not a backfill shard and cannot be one unfinished (not Parquet, or
    /// unreadable): what it is. Replaced only with `--force`.
    NotShard(String),
    /// A Parquet file that is not a backfill shard of this version.
    Foreign,
    /// A shard of what `Identity` says, as its footer claims: [`verify`] reads its rows.
    Finished(Identity),
}

/// Parquet's magic, at the start and at the end of every Parquet file.
const MAGIC: &[u8] = b"PAR1";

/// Reads what `path` is from its first bytes and its footer, without reading its rows.
///
/// A file that does not start with `PAR1` was never a Parquet file, so it is someone else's (a
/// manifest, a CSV, notes) and losing it loses work: it is [`Existing::NotShard`]. One that
/// starts with `PAR1` but has no readable footer is a Parquet file cut short, which is what an
/// interrupted copy of a shard leaves; an empty file holds nothing to lose. Both are
/// [`Existing::Unfinished`].
pub fn inspect(path: &Path) -> Existing {
    let mut file = match crate::regular_file::open(path) {
        Ok((f, _)) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Existing::Missing,
        Err(e) => return Existing::NotShard(format!("cannot be read ({e})")),
    };
    let mut head = Vec::with_capacity(MAGIC.len());
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, MAGIC.len() as u64), &mut head) {
        return Existing::NotShard(format!("cannot be read ({e})"));
    }
    if head.is_empty() {
        return Existing::Unfinished("it is empty".into());
    }
    if head != MAGIC {
        return Existing::NotShard("is not a Parquet file (it does not start with PAR1)".into());
    }
    let reader = match SerializedFileReader::new(file) {
        Ok(r) => r,
        Err(e) => return Existing::Unfinished(e.to_string()),
    };
    let meta = reader.metadata().file_metadata();
    let Some(identity) = Identity::from_key_values(&key_values(&reader)) else { return Existing::Foreign };
    if meta.num_rows() < 0 || meta.num_rows() as u64 != identity.rows {
        return Existing::Unfinished(format!("it holds {} rows of the {} it claims", meta.num_rows(), identity.rows));
    }
    Existing::Finished(identity)
}

/// What [`verify`] found in a finished shard's rows.
#[derive(Debug, Default)]
pub struct Verified {
    /// Rows that carry an error.
    pub failed: u64,
    /// Failed rows by error code, for the codes a rerun may change ([`crate::error::RETRYABLE_CODES`]).
    pub retryable: BTreeMap<String, u64>,
}

impl Verified {
    /// Rows whose failure a rerun may change.
    pub fn retryable_rows(&self) -> u64 {
        self.retryable.values().sum()
    }
}

/// Reads every row and every column of the shard at `path` and checks that its `line` values
/// are exactly `lines`, in order; answers what failed, or why the file is not the shard.
///
/// A page whose bytes were overwritten either fails to decode, fails its CRC (only pages written
/// with one: the parquet crate writes none, pyarrow can), or decodes to other values: the `line`
/// column is checked value by value, the other columns only for decoding. A changed score in a
/// page that still decodes is not detected.
pub fn verify(path: &Path, lines: &[u64]) -> Result<Verified, String> {
    let mut out = Verified::default();
    let mut k = 0_usize;
    read_rows(path, |row| {
        match lines.get(k) {
            Some(&want) if i64::try_from(want).ok() == Some(row.line) => {}
            Some(want) => bail!("row {} holds line {}, not line {want}", k + 1, row.line),
            None => bail!("it holds more than the shard's {} rows", lines.len()),
        }
        k += 1;
        if let Some(code) = row.error_code {
            out.failed += 1;
            if crate::error::is_retryable(&code) {
                *out.retryable.entry(code).or_default() += 1;
            }
        }
        Ok(())
    })
    .map_err(|e| format!("{e:#}"))?;
    if k != lines.len() {
        return Err(format!("it holds {k} rows of the shard's {}", lines.len()));
    }
    Ok(out)
}

fn key_values(reader: &SerializedFileReader<File>) -> BTreeMap<String, String> {
    reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().filter_map(|k| Some((k.key.clone(), k.value.clone()?))).collect())
        .unwrap_or_default()
}

/// A nullable column's values and definition levels.
#[derive(Default)]
struct Opt<T> {
    values: Vec<T>,
    defs: Vec<i16>,
}

impl<T> Opt<T> {
    fn push(&mut self, v: Option<T>) {
        self.defs.push(i16::from(v.is_some()));
        self.values.extend(v);
    }
}

/// The buffered row group, column by column in [`SCHEMA`]'s order.
#[derive(Default)]
struct Columns {
    line: Vec<i64>,
    input: Vec<ByteArray>,
    model: Vec<ByteArray>,
    model_version: Vec<ByteArray>,
    calibration_sha256: Opt<ByteArray>,
    calibrated: Vec<bool>,
    q_score: Opt<f32>,
    likely_misclassified: Opt<bool>,
    p_misclassified: Opt<f32>,
    risk_source: Opt<ByteArray>,
    predicted_class: Opt<ByteArray>,
    class_probability: Opt<f32>,
    risk: Opt<f64>,
    mu: Opt<f32>,
    sigma: Opt<f32>,
    z_max: Opt<f32>,
    q_v1: Opt<f32>,
    l2_norm: Opt<f32>,
    active: Opt<i32>,
    active_discriminative: Opt<i32>,
    dim: Opt<i32>,
    discriminative_features: Opt<ByteArray>,
    error_code: Opt<ByteArray>,
    error_message: Opt<ByteArray>,
}

fn text(s: &str) -> ByteArray {
    ByteArray::from(s.as_bytes().to_vec())
}

fn int(v: usize) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// Writes one shard's rows; [`ShardWriter::finish`] checks every row arrived.
pub struct ShardWriter {
    writer: SerializedFileWriter<File>,
    identity: Identity,
    buffered: Columns,
    pending: usize,
    written: u64,
    retryable: u64,
}

impl ShardWriter {
    /// Starts the file of `identity` in `file`.
    pub fn new(file: File, identity: Identity) -> anyhow::Result<Self> {
        let schema = Arc::new(parse_message_type(SCHEMA).expect("the backfill schema parses"));
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_key_value_metadata(Some(identity.key_values()))
            .set_created_by(format!("qscore {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = SerializedFileWriter::new(file, schema, Arc::new(props))?;
        Ok(Self { writer, identity, buffered: Columns::default(), pending: 0, written: 0, retryable: 0 })
    }

    /// Adds the row of manifest line `line`, `input`, and its answer.
    pub fn push(&mut self, line: u64, input: &str, answer: Result<&ImageScore, &ErrorDetail>) -> anyhow::Result<()> {
        let c = &mut self.buffered;
        let id = &self.identity;
        c.line.push(i64::try_from(line).unwrap_or(i64::MAX));
        c.input.push(text(input));
        c.model.push(text(&id.model));
        c.model_version.push(text(&id.model_version));
        c.calibration_sha256.push(id.calibration_sha256.as_deref().map(text));
        c.calibrated.push(id.calibration_sha256.is_some());
        let s = answer.ok();
        c.q_score.push(s.map(|s| s.q_score));
        c.likely_misclassified.push(s.and_then(|s| s.likely_misclassified));
        c.p_misclassified.push(s.and_then(|s| s.p_misclassified));
        c.risk_source.push(
            s.and_then(|s| s.risk_source).and_then(|r| serde_json::to_value(r).ok()).and_then(|v| v.as_str().map(text)),
        );
        c.predicted_class.push(s.and_then(|s| s.predicted_class.as_deref()).map(text));
        c.class_probability.push(s.and_then(|s| s.class_probability));
        c.risk.push(s.map(ImageScore::risk));
        c.mu.push(s.map(|s| s.stats.mu));
        c.sigma.push(s.map(|s| s.stats.sigma));
        c.z_max.push(s.map(|s| s.stats.z_max));
        c.q_v1.push(s.map(|s| s.stats.q_v1));
        c.l2_norm.push(s.map(|s| s.stats.l2_norm));
        c.active.push(s.map(|s| int(s.stats.active)));
        c.active_discriminative.push(s.map(|s| int(s.stats.active_discriminative)));
        c.dim.push(s.map(|s| int(s.stats.dim)));
        let features = s.map(|s| serde_json::to_string(&s.discriminative_features)).transpose()?;
        c.discriminative_features.push(features.as_deref().map(text));
        let e = answer.err();
        self.retryable += u64::from(e.is_some_and(|e| crate::error::is_retryable(&e.code)));
        c.error_code.push(e.map(|e| text(&e.code)));
        c.error_message.push(e.map(|e| text(&e.message)));
        self.pending += 1;
        if self.pending >= ROW_GROUP_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let c = std::mem::take(&mut self.buffered);
        let mut rg = self.writer.next_row_group()?;
        write::<Int64Type>(&mut rg, &c.line, None)?;
        write::<ByteArrayType>(&mut rg, &c.input, None)?;
        write::<ByteArrayType>(&mut rg, &c.model, None)?;
        write::<ByteArrayType>(&mut rg, &c.model_version, None)?;
        write::<ByteArrayType>(&mut rg, &c.calibration_sha256.values, Some(&c.calibration_sha256.defs))?;
        write::<BoolType>(&mut rg, &c.calibrated, None)?;
        write::<FloatType>(&mut rg, &c.q_score.values, Some(&c.q_score.defs))?;
        write::<BoolType>(&mut rg, &c.likely_misclassified.values, Some(&c.likely_misclassified.defs))?;
        write::<FloatType>(&mut rg, &c.p_misclassified.values, Some(&c.p_misclassified.defs))?;
        write::<ByteArrayType>(&mut rg, &c.risk_source.values, Some(&c.risk_source.defs))?;
        write::<ByteArrayType>(&mut rg, &c.predicted_class.values, Some(&c.predicted_class.defs))?;
        write::<FloatType>(&mut rg, &c.class_probability.values, Some(&c.class_probability.defs))?;
        write::<DoubleType>(&mut rg, &c.risk.values, Some(&c.risk.defs))?;
        for f in [&c.mu, &c.sigma, &c.z_max, &c.q_v1, &c.l2_norm] {
            write::<FloatType>(&mut rg, &f.values, Some(&f.defs))?;
        }
        for i in [&c.active, &c.active_discriminative, &c.dim] {
            write::<Int32Type>(&mut rg, &i.values, Some(&i.defs))?;
        }
        for s in [&c.discriminative_features, &c.error_code, &c.error_message] {
            write::<ByteArrayType>(&mut rg, &s.values, Some(&s.defs))?;
        }
        if rg.next_column()?.is_some() {
            bail!("internal error: the backfill schema has more columns than are written");
        }
        rg.close()?;
        self.written += self.pending as u64;
        self.pending = 0;
        Ok(())
    }

    /// Writes the last row group and the footer; fails unless every row of the shard was
    /// pushed, so a short file is never committed as complete.
    pub fn finish(mut self) -> anyhow::Result<File> {
        self.flush()?;
        if self.written != self.identity.rows {
            bail!("internal error: {} rows written of the shard's {}", self.written, self.identity.rows);
        }
        // Known only now: for readers (a person, pyarrow), while a resume counts from the rows.
        self.writer.append_key_value_metadata(KeyValue::new(
            "qscore.retryable_failures".to_owned(),
            self.retryable.to_string(),
        ));
        Ok(self.writer.into_inner()?)
    }
}

fn write<T: parquet::data_type::DataType>(
    rg: &mut SerializedRowGroupWriter<'_, File>,
    values: &[T::T],
    defs: Option<&[i16]>,
) -> anyhow::Result<()> {
    let mut col =
        rg.next_column()?.context("internal error: the backfill schema has fewer columns than are written")?;
    col.typed::<T>().write_batch(values, defs, None)?;
    col.close()?;
    Ok(())
}

/// One row of a shard file, as `qscore drift` reads it.
#[derive(Debug, Default)]
pub struct StoredRow {
    /// The entry's line in the manifest.
    pub line: i64,
    /// The model that scored it.
    pub model: String,
    /// Its calibration's SHA-256.
    pub calibration_sha256: Option<String>,
    /// Q-Score, None for a failed entry.
    pub q_score: Option<f32>,
    /// p_misclassified.
    pub p_misclassified: Option<f32>,
    /// The flag.
    pub likely_misclassified: Option<bool>,
    /// L ∩ D's feature indices.
    pub features: Vec<u32>,
    /// The error code of a failed entry.
    pub error_code: Option<String>,
}

/// Opens a backfill file: its reader and the identity its footer claims; fails naming `path`
/// when it is not one.
fn open_shard(path: &Path) -> anyhow::Result<(SerializedFileReader<File>, Identity)> {
    let (file, _) = crate::regular_file::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| {
        format!("{} is not a readable Parquet file (truncated, or still being written?)", path.display())
    })?;
    let Some(identity) = Identity::from_key_values(&key_values(&reader)) else {
        bail!(
            "{} is not a qscore backfill file ({FORMAT}); give --scores the files `qscore score --format parquet` wrote",
            path.display()
        );
    };
    Ok((reader, identity))
}

/// The identity a backfill file's footer claims, without reading its rows.
pub fn read_identity(path: &Path) -> anyhow::Result<Identity> {
    open_shard(path).map(|(_, identity)| identity)
}

/// Reads every row of a backfill file, in order, calling `each` on it; fails naming `path`
/// when it is not a backfill file, and naming the row's line when a value is one qscore never
/// writes (a q_score that is not finite, a p_misclassified outside [0, 1]): the file is corrupt
/// or forged, and its statistics would be meaningless.
pub fn read_rows(path: &Path, mut each: impl FnMut(StoredRow) -> anyhow::Result<()>) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Feature {
        index: u32,
    }
    let (reader, _) = open_shard(path)?;
    for row in reader.get_row_iter(None)? {
        let row = row?;
        let mut r = StoredRow::default();
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("line", Field::Long(v)) => r.line = *v,
                ("model", Field::Str(s)) => r.model = s.clone(),
                ("calibration_sha256", Field::Str(s)) => r.calibration_sha256 = Some(s.clone()),
                ("q_score", Field::Float(v)) => r.q_score = Some(*v),
                ("p_misclassified", Field::Float(v)) => r.p_misclassified = Some(*v),
                ("likely_misclassified", Field::Bool(v)) => r.likely_misclassified = Some(*v),
                ("error_code", Field::Str(s)) => r.error_code = Some(s.clone()),
                ("discriminative_features", Field::Str(s)) => {
                    let features: Vec<Feature> = serde_json::from_str(s).with_context(|| {
                        format!("{}: a discriminative_features cell is not the JSON qscore writes", path.display())
                    })?;
                    r.features = features.into_iter().map(|f| f.index).collect();
                }
                (
                    "calibration_sha256"
                    | "q_score"
                    | "p_misclassified"
                    | "likely_misclassified"
                    | "error_code"
                    | "discriminative_features",
                    Field::Null,
                ) => {}
                // A column read here in another type (a float64 q_score from a rewrite) would
                // otherwise leave the row looking unscored, and drop it from every figure.
                (
                    "line"
                    | "model"
                    | "calibration_sha256"
                    | "q_score"
                    | "p_misclassified"
                    | "likely_misclassified"
                    | "error_code"
                    | "discriminative_features",
                    other,
                ) => bail!(
                    "{}: column `{name}` holds {other:?}, not the type qscore writes; the file was rewritten by another \
                     tool: delete it and score its shard again",
                    path.display()
                ),
                _ => {}
            }
        }
        let bad = |what: String| {
            anyhow::anyhow!(
                "{}: the row of manifest line {} has {what}, which qscore never writes; the file is corrupt or was \
                 not written by qscore: delete it and score its shard again",
                path.display(),
                r.line
            )
        };
        if let Some(q) = r.q_score.filter(|q| !q.is_finite()) {
            return Err(bad(format!("q_score {q}")));
        }
        if let Some(p) = r.p_misclassified.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(bad(format!("p_misclassified {p}")));
        }
        // Every row qscore writes is scored or failed, never both or neither.
        if r.q_score.is_some() == r.error_code.is_some() {
            return Err(bad("both or neither of a q_score and an error_code".into()));
        }
        each(r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::Timings,
        qscore::{ActiveFeature, Stats},
        risk::RiskSource,
    };

    fn answer(i: usize) -> ImageScore {
        ImageScore {
            model: "m".into(),
            q_score: i as f32 / 10.0,
            calibrated: true,
            likely_misclassified: Some(i.is_multiple_of(3)),
            p_misclassified: Some((i % 10) as f32 / 10.0),
            risk_source: Some(RiskSource::QScore),
            predicted_class: Some("coat".into()),
            class_probability: Some(0.5),
            discriminative_features: (0..i % 4)
                .map(|j| ActiveFeature { index: 7 * j, activation: 1.0, z_score: 4.5 })
                .collect(),
            stats: Stats {
                mu: 0.1,
                sigma: 0.2,
                active: 3,
                active_discriminative: i % 4,
                z_max: 5.0,
                q_v1: 0.01,
                l2_norm: 2.0,
                dim: 512,
            },
            timings_ms: Timings { decode: 0.0, queue: 0.0, inference: 0.0, batch_size: 1, total: 0.0 },
            embedding: None,
            embedding_features: None,
        }
    }

    /// Rows across several row groups come back in order, failures as failures, and the file
    /// says what it is; prints the writer's speed.
    #[test]
    fn rows_round_trip_across_row_groups() {
        let path = std::env::temp_dir().join(format!("qscore-table-{}.parquet", std::process::id()));
        let rows = 2 * ROW_GROUP_ROWS as u64 + 17;
        let identity = Identity {
            manifest_sha256: "ab".repeat(32),
            shard: Shard { index: 1, count: 2 },
            model: "m".into(),
            model_version: "1".into(),
            calibration_sha256: Some("cd".repeat(32)),
            rows,
        };
        let failure = ErrorDetail { code: "unreadable_file".into(), message: "gone".into() };
        let answers: Vec<ImageScore> = (0..rows as usize).map(answer).collect();
        let started = std::time::Instant::now();
        let mut w = ShardWriter::new(File::create(&path).unwrap(), identity.clone()).unwrap();
        for (i, a) in answers.iter().enumerate() {
            let result = if i % 5 == 4 { Err(&failure) } else { Ok(a) };
            w.push(i as u64 + 1, &format!("img/{i}.png"), result).unwrap();
        }
        w.finish().unwrap().sync_all().unwrap();
        let took = started.elapsed();
        println!("{rows} rows written in {took:.2?}: {:.0} rows/s", rows as f64 / took.as_secs_f64());

        match inspect(&path) {
            Existing::Finished(found) => assert_eq!(found, identity),
            other => panic!("{other:?}"),
        }
        let mut i: usize = 0;
        read_rows(&path, |r| {
            if i % 5 == 4 {
                assert_eq!(r.error_code.as_deref(), Some("unreadable_file"));
                assert_eq!(r.q_score, None);
            } else {
                assert_eq!(r.q_score, Some(i as f32 / 10.0));
                assert_eq!(r.likely_misclassified, Some(i.is_multiple_of(3)));
                assert_eq!(r.features, (0..i % 4).map(|j| 7 * j as u32).collect::<Vec<_>>());
            }
            assert_eq!(r.calibration_sha256, identity.calibration_sha256);
            i += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(i as u64, rows);

        // A writer that did not get every row refuses to finish.
        let mut short = ShardWriter::new(File::create(&path).unwrap(), identity).unwrap();
        short.push(1, "a.png", Err(&failure)).unwrap();
        assert!(short.finish().is_err());
        std::fs::remove_file(&path).unwrap();
    }

    /// A q_score that is not finite, or a p_misclassified outside [0, 1], is an error naming the
    /// file and the row's line, never a value handed to the drift maths.
    #[test]
    fn impossible_values_are_refused_naming_the_line() {
        for (q, p, says) in [(f32::NAN, 0.5, "q_score NaN"), (1.0, 5.0, "p_misclassified 5"), (1.0, -3.0, "-3")] {
            let path = std::env::temp_dir().join(format!("qscore-table-bad-{}.parquet", std::process::id()));
            let identity = Identity {
                manifest_sha256: "ab".repeat(32),
                shard: Shard::WHOLE,
                model: "m".into(),
                model_version: "1".into(),
                calibration_sha256: Some("cd".repeat(32)),
                rows: 2,
            };
            let mut bad = answer(1);
            bad.q_score = q;
            bad.p_misclassified = Some(p);
            let mut w = ShardWriter::new(File::create(&path).unwrap(), identity).unwrap();
            w.push(1, "a.png", Ok(&answer(2))).unwrap();
            w.push(7, "b.png", Ok(&bad)).unwrap();
            w.finish().unwrap();
            let e = format!("{:#}", read_rows(&path, |_| Ok(())).unwrap_err());
            assert!(e.contains(&path.display().to_string()) && e.contains("line 7") && e.contains(says), "{e}");
            assert!(verify(&path, &[1, 7]).is_err(), "a resume does not trust it either");
            std::fs::remove_file(&path).unwrap();
        }
    }
}
