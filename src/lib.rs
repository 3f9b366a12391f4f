//! symb: from a corpus of a new language to a language model running in a
//! web browser. A TOML manifest becomes a content-hashed graph of stages;
//! every artifact is cached and only what changed re-runs.
//!
//! Layers, each importing only those above it:
//! - [`cache`]: the content-addressed store (no knowledge of stages);
//! - [`engine`]: the graph, keys, executor and reasons (no ML);
//! - [`manifest`]: `symb.toml` parsed and validated;
//! - [`stages`]: the stage kinds;
//! - [`ray`]: the engine's dispatch seam over a Ray cluster;
//! - [`project`]: a manifest + plan + cache, and the operations on it;
//! - [`cli`]: the command line, the only place that prints.

pub mod cache;
pub mod cli;
pub mod dtype;
pub mod engine;
pub mod lint;
pub mod manifest;
pub mod model;
pub mod onnx;
pub mod project;
pub mod quant;
pub mod ray;
pub mod serve;
pub mod stages;
pub mod verify;
