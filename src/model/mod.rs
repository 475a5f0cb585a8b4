//! Models at rest: what a model folder holds (manifest, calibration file) and the one ONNX
//! Runtime session that runs it. No threads and no metrics: the running engine
//! ([`crate::engine`]) joins each model to its inference thread.

pub mod calibration;
pub mod encoder;
pub mod manifest;
pub mod runtime;
