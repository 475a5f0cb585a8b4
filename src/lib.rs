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
//! http (parse, validate, answer) → scoring (decode, batch) → batch (worker thread, ort session)
//!                                → qscore (maths) → http
//! ```
//!
//! - [`config`]: flags and `QSCORE_*` variables, parsed once.
//! - [`http`]: the axum router, handlers, error mapping and OpenAPI document.
//! - [`scoring`]: the pipeline shared by the server and `qscore score`.
//! - [`image`]: decode with limits (every derived size bounded), resize, normalise.
//! - [`budget`]: the one memory budget every request-held byte and every decode reserves from.
//! - [`batch`]: the per-model inference thread.
//! - [`model`]: manifests, calibration files, ONNX Runtime sessions, the registry.
//! - [`qscore`]: the maths of design.md section 1, pure and tested on hand-computed cases.
//! - [`probe`], [`neighbours`], [`risk`], [`isotonic`], [`ranking`]: the pieces calibration
//!   measures and the server applies: the linear probe, the nearest-neighbour estimator, the
//!   risk estimators, the isotonic map to p(misclassified), AUROC/AUPRC.
//! - [`calibrate`]: `qscore calibrate` and `qscore evaluate`, offline.
//! - [`metrics`]: the Prometheus families.
//! - [`drift`]: rolling windows of recent answers against the calibration reference.
//! - [`webhook`]: flagged answers pushed to one configured endpoint, off the request path.

pub mod calibrate;
pub mod config;
pub mod drift;
pub mod error;
pub mod http;
pub mod engine;
pub mod image;
pub mod metrics;
pub mod model;
pub mod qscore;
pub mod risk;
pub mod server;
