//! Generates the ONNX protobuf types from `proto/onnx.proto` (unmodified)
//! with `protox`, a protobuf compiler in Rust, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    // Tensor bytes as `bytes::Bytes`: a model decoded from a mapped file
    // points into it instead of copying every weight.
    prost_build::Config::new().bytes([".onnx.TensorProto.raw_data"]).compile_fds(descriptors)?;
    Ok(())
}
