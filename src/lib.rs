//! qscore: label-free representation quality for images, served over HTTP.
//!
//! A self-supervised encoder (SimCLR, BYOL, DINO, ...) exported to ONNX turns an image into a
//! representation h. Kalibhat et al. (AAAI 2024) observed that a few "discriminative" features
//! of h fire strongly on images the encoder understands, and proposed the Q-Score to measure
//! it without labels. qscore computes that score for every uploaded image, and, for a model
//! calibrated on labelled data, the probability that a linear probe gets the image wrong.
//!
//! The data flows one way, and the modules follow it:
//!
//! ```text
//! edges (translate only)            core                                         pure maths
//! http::handlers  (/v1)      ─┐
//! http::kserve    (/v2)       │    engine::Engine::score(model, inputs)
//! http::labelstudio (/predict)├──►   admission, memory budget (engine::admission, ::budget)
//! main: `qscore score`        │      decode slot → image::prepare
//! calibrate: `qscore calibrate`┘     engine::batch::Worker → Embedder (model::encoder: ort)  ──► qscore, risk
//!                                    side effects once: metrics, drift, FlaggedObservers (engine::webhook)
//!                            ◄──   one Output per input, in order
//! ```
//!
//! Every edge turns its protocol into `Vec<engine::Input>` (an id and bytes, or the error that
//! stopped them) and the answers back into its protocol; nothing else. The offline commands open
//! the same engine as the server and never import the HTTP layer; the HTTP layer does no maths
//! and owns every status code.
//!
//! - [`config`]: flags and `QSCORE_*` variables, parsed once into plain configuration.
//! - [`engine`]: the running core: open, registry of loaded models, admission, memory budget,
//!   batching worker, the one scoring entry point and its observers.
//! - [`model`]: a model folder at rest: manifest, calibration file, one ONNX Runtime session.
//! - [`image`]: decode with limits (every derived size bounded), resize, normalise.
//! - [`qscore`]: the maths of design.md section 1, pure and tested on hand-computed cases.
//! - [`explain`]: occlusion sensitivity, pure: the patch plan and its bounds, the occluded
//!   copies, heatmaps from the drops, the overlay drawing, the client's feature list. The engine
//!   runs the copies through the model's worker ([`engine::explain`]); `/v1/explain` and
//!   `qscore explain` translate.
//! - [`risk`]: the probe, the nearest-neighbour estimator, the risk estimators, the isotonic map
//!   to p(misclassified), AUROC/AUPRC, and the one `measure` serving and calibration share.
//! - [`drift`]: rolling windows of recent answers against the calibration reference;
//!   [`drift::embedding`] tests the embeddings themselves (MMD² with a permutation p-value).
//! - [`http`]: the axum router, one module per protocol edge, connections, error mapping and
//!   the OpenAPI document.
//! - [`calibrate`]: `qscore calibrate` and `qscore evaluate`, offline.
//! - [`backfill`]: `qscore score --manifest` (sharded, resumable, Parquet) and `qscore drift`
//!   over its output: the same engine and the same drift statistics, offline.
//! - [`atomic_file`]: files that appear whole or not at all (calibration.json, Parquet shards).
//! - [`metrics`]: the Prometheus families.
//! - [`error`]: the one error type, its stable codes and `{code, message}` shape.
//! - [`server`]: start-up and shutdown of `qscore serve`.

#![warn(missing_docs)]

pub mod atomic_file;
pub mod backfill;
pub mod calibrate;
pub mod config;
pub mod digest;
pub mod drift;
pub mod engine;
pub mod error;
pub mod explain;
pub mod fetch;
pub mod http;
pub mod image;
pub mod metrics;
pub mod model;
pub mod qscore;
pub mod regular_file;
pub mod risk;
pub mod server;
