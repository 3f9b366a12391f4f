//! Single-matmul GFLOP/s of candle's CPU matmul at the shapes a training
//! step runs (GPT-2 small and SmolLM2-135M, 1,024 rows: batch 8 x block
//! 128), for `bench/matmul.py`, which sets it beside PyTorch's and
//! OpenBLAS's. Prints one JSON line per shape.
//!
//!     cargo run --release --example matmul

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    symb::model::ops::configure_threads();
    let shapes = [(1024, 768, 2304), (1024, 768, 3072), (1024, 3072, 768), (1024, 768, 57689), (1024, 57689, 768), (1024, 576, 1536), (1024, 1536, 576), (1024, 576, 49152)];
    for (m, k, n) in shapes {
        let a = Tensor::rand(0f32, 1f32, (m, k), &Device::Cpu)?;
        let b = Tensor::rand(0f32, 1f32, (k, n), &Device::Cpu)?;
        a.matmul(&b)?;
        let (start, mut runs) = (std::time::Instant::now(), 0);
        while start.elapsed().as_secs_f64() < 1.0 {
            a.matmul(&b)?;
            runs += 1;
        }
        let gflops = 2.0 * (m * k * n) as f64 * runs as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!("{}", serde_json::json!({"m": m, "k": k, "n": n, "gflops": gflops}));
    }
    Ok(())
}
