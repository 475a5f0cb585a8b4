//! Models: what a model folder holds (manifest, calibration), the ONNX Runtime session that
//! runs it, and the registry of everything loaded at start-up.

pub mod calibration;
pub mod encoder;
pub mod manifest;
pub mod registry;
pub mod runtime;

pub use registry::{Model, Registry, Selection};
