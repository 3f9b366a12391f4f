//! symb: from a corpus of a new language to a language model running in a
//! web browser. A TOML manifest becomes a content-hashed graph of stages;
//! every artifact is cached and only what changed re-runs.
//!
//! The modules, from the bottom up: each uses only modules listed above it
//! (`tests/shape.rs` checks it). `engine` and `cache` know nothing of
//! machine learning; only `cli` prints.
//! - [`cache`]: the content-addressed artifact store, local and shared (S3);
//! - [`engine`]: the graph of stages, their keys, the executor and the reasons for each re-run;
//! - [`dtype`]: the closed set of export dtypes and everything named after one;
//! - [`chat`]: chat templates, rendered as Python transformers renders them;
//! - [`onnx`]: the ONNX protobuf types, a graph builder and the decoder contract;
//! - [`model`]: the model families in candle (each with its ONNX lowering), LoRA,
//!   training, Hub and GGUF loading;
//! - [`verify`]: an ONNX file in ONNX Runtime against the model's own forward pass;
//! - [`quant`]: the quantizers over ONNX graphs (fp16, q8, int8/uint8, q4, q4f16),
//!   the 4-bit ones calibrated on activations ONNX Runtime measures;
//! - [`lint`]: an output folder against what transformers.js needs to load it;
//! - [`serve`]: an output folder and its playground over HTTP on 127.0.0.1;
//! - [`manifest`]: `symb.toml` parsed and validated, every error at its line;
//! - [`stages`]: the stage kinds, and the plan a manifest becomes;
//! - [`ray`]: the engine's dispatch seam over a Ray cluster;
//! - [`project`]: a manifest, its plan and its cache, and the operations on them;
//! - [`cli`]: the command line, the only place that prints.

/// symb's own version, part of every stage key.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod cache;
pub mod chat;
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
