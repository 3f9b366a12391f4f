//! Single-matmul GFLOP/s of candle's CPU matmul at the shapes a training
//! step runs (GPT-2 small and SmolLM2-135M, 1,024 rows: batch 8 x block
//! 128), for `bench/matmul.py`, which sets it beside PyTorch's and
//! OpenBLAS's. Prints one JSON line per shape.
//!
//!     cargo run --release --example matmul

use candle_core::{Device, Tensor};

/// `(m, k, n, lhs stored transposed, rhs stored transposed)`: `lhs` `[m, k]`
/// and `rhs` `[k, n]`, each either contiguous or a transposed view of a
/// contiguous matrix, as the step uses them (a backward `g · Wᵀ` takes the
/// weight transposed; the head's forward takes `[vocab, width]` transposed).
pub const SHAPES: [(usize, usize, usize, bool, bool); 16] = [
    // GPT-2 small: c_attn, c_fc, mlp c_proj, forward and input gradient.
    (1024, 768, 2304, false, false),
    (1024, 2304, 768, false, true),
    (1024, 768, 3072, false, false),
    (1024, 3072, 768, false, true),
    (1024, 3072, 768, false, false),
    (1024, 768, 3072, false, true),
    // The tied head over 57,689 tokens, one chunk of 290 rows: logits, input gradient.
    (290, 768, 57689, false, true),
    (290, 57689, 768, false, false),
    (1024, 768, 57689, false, false),
    (1024, 57689, 768, false, false),
    // SmolLM2-135M: torch.nn.Linear weights are [out, in]: forward takes them transposed.
    (1024, 576, 1536, false, true),
    (1024, 1536, 576, false, false),
    (1024, 1536, 576, false, true),
    (1024, 576, 1536, false, false),
    (340, 576, 49152, false, true),
    (340, 49152, 576, false, false),
];

fn operand(rows: usize, cols: usize, transposed: bool) -> candle_core::Result<Tensor> {
    if transposed {
        Tensor::rand(0f32, 1f32, (cols, rows), &Device::Cpu)?.t()
    } else {
        Tensor::rand(0f32, 1f32, (rows, cols), &Device::Cpu)
    }
}

fn main() -> candle_core::Result<()> {
    symb::model::ops::configure_threads();
    for (m, k, n, lhs_t, rhs_t) in SHAPES {
        let a = operand(m, k, lhs_t)?;
        let b = operand(k, n, rhs_t)?;
        a.matmul(&b)?;
        let (start, mut runs) = (std::time::Instant::now(), 0);
        while start.elapsed().as_secs_f64() < 1.0 {
            a.matmul(&b)?;
            runs += 1;
        }
        let gflops = 2.0 * (m * k * n) as f64 * runs as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!(
            "{}",
            serde_json::json!({"m": m, "k": k, "n": n, "lhs_t": lhs_t, "rhs_t": rhs_t, "gflops": gflops})
        );
    }
    Ok(())
}
