//! Custom candle ops for training on the CPU, where candle's generic
//! backward pays for work nobody needs. Each is one node with an analytic
//! backward (f32):
//!
//! - [`frozen_matmul`], [`frozen_linear`]: `x · W` (and `+ b`) for a weight
//!   that does not train. candle's matmul backward always computes both
//!   operands' gradients; with LoRA that is `xᵀ · grad` for every frozen
//!   weight and the tied head, as much work as the forward pass and a
//!   weight-sized buffer each. These return the input's gradient only.
//! - [`lora_linear`]: a frozen linear layer with its LoRA adapter (and the
//!   adapter's dropout mask) in one node.
//! - [`gelu_tanh`] (GPT-2's `gelu_new`), [`silu_mul`] (Llama's gated MLP),
//!   [`layer_norm`], [`rms_norm`]: activations and norms without the
//!   intermediates candle's composed ops keep for backward.
//! - [`split_heads`]: `[b, t, h·d]` to `[b, h, t, d]`, with the rotary
//!   embedding applied on the way when given its frequencies.
//! - [`cross_entropy`]: mean next-token loss over `[n, vocab]` logits in one
//!   pass per row (log-sum-exp), with the gradient `(softmax − onehot) / n`
//!   written in one buffer. Built from primitive ops
//!   ([`cross_entropy_reference`], which the tests hold it to) it kept four
//!   logits-sized intermediates alive until backward (236 MB each at a 57,689
//!   vocabulary and 1,024 positions).
//! - [`linear_cross_entropy`], [`linear_cross_entropy_rows`]: the loss of
//!   `hidden · headᵀ` a chunk of rows at a time, never holding the logits;
//!   the second with the new tokens' rows of the head trained.
//!
//! And the process settings training wants: [`keep_freed_memory`] (the
//! allocator keeps activation-sized blocks instead of unmapping them) and
//! [`configure_threads`] (candle's own pool stops spinning beside rayon's).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::Result;

/// Tells glibc's allocator to keep freed memory for reuse instead of giving
/// it back to the system at once. Training allocates and frees the same
/// activation-sized buffers every step; by default blocks over a few MB are
/// mapped and unmapped each time, and the kernel zeroes every page again
/// (a third of the time of a GPT-2 small step went to page faults and page
/// clearing). Peak memory is unchanged: the same sizes are reused. A no-op
/// elsewhere than Linux with glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only sets allocator parameters; glibc accepts
        // these values (32 MiB is its largest mmap threshold on 64-bit).
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
        }
    }
}

/// Settles how candle's CPU threads wait, before any exists (call it
/// first thing in `main`, while the process has one thread). candle runs
/// binary ops on a pool of its own whose threads spin after each op while
/// rayon runs the matmuls; with few cores the spinning takes the matmuls'
/// time. A spin limit of 1 (park at once) trains a SmolLM2-shaped model 6%
/// faster on 2 cores (bench/train_throughput.py, alternating runs). A value
/// the user set in `CANDLE_BARRIER_POOL_SPIN_LIMIT` is kept.
pub fn configure_threads() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        // SAFETY: called before any other thread exists (the start of
        // `main`), so nothing reads the environment concurrently.
        unsafe { std::env::set_var(SPIN_LIMIT, "1") };
    }
}

struct FrozenMatmul {
    /// `[k, n]`, any strides the CPU matmul takes (a transposed view works).
    weight: Tensor,
    /// `[n]`, frozen, added to every row.
    bias: Option<Tensor>,
}

/// The bias as a vector of `n`, checked.
fn bias_values(bias: Option<&Tensor>, n: usize, op: &str) -> candle_core::Result<Option<Vec<f32>>> {
    let Some(bias) = bias else { return Ok(None) };
    if bias.dims() != [n] {
        candle_core::bail!("{op}: a bias {:?} for {n} outputs", bias.dims());
    }
    Ok(Some(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

/// `y[r, j] += scale · v[r, j] + bias[j]` over rows of `n`, in parallel;
/// either term may be absent.
fn add_rows(y: &mut [f32], n: usize, v: Option<(&[f32], f32)>, bias: Option<&[f32]>) {
    if n == 0 || (v.is_none() && bias.is_none()) {
        return;
    }
    y.par_chunks_mut(n)
        .enumerate()
        .for_each(|(r, row)| match (v, bias) {
            (Some((v, scale)), Some(bias)) => row
                .iter_mut()
                .zip(&v[r * n..(r + 1) * n])
                .zip(bias)
                .for_each(|((y, v), b)| *y += scale * v + b),
            (Some((v, scale)), None) => row
                .iter_mut()
                .zip(&v[r * n..(r + 1) * n])
                .for_each(|(y, v)| *y += scale * v),
            (None, Some(bias)) => row.iter_mut().zip(bias).for_each(|(y, b)| *y += b),
            (None, None) => {}
        });
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = self.weight.dims2()?;
        let dims = layout.dims();
        if dims.last() != Some(&k) || !layout.is_contiguous() {
            candle_core::bail!("frozen-matmul: input {dims:?} is not a contiguous [.., {k}]");
        }
        let m = layout.shape().elem_count() / k;
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("frozen-matmul: the weight is not on the CPU")
        };
        let lhs = Layout::contiguous_with_offset((m, k), layout.start_offset());
        let bias = bias_values(self.bias.as_ref(), n, "frozen-matmul")?;
        let mut out = f32_vec(storage.matmul(weight, (1, m, n, k), &lhs, weight_layout)?)?;
        add_rows(&mut out, n, None, bias.as_deref());
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (k, n) = self.weight.dims2()?;
        let grad = grad_res.reshape(((), n))?.matmul(&self.weight.t()?)?;
        debug_assert_eq!(grad.dim(1)?, k);
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

/// `x · weight` (`x` `[.., k]`, `weight` `[k, n]`) whose backward reaches
/// `x` only: the weight is treated as a constant.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    frozen_linear(x, weight, None)
}

/// `x · weight + bias`, both frozen, one node (a bias added by candle is a
/// node more, whose backward allocates and adds an output-sized gradient).
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.detach(),
        bias: bias.map(Tensor::detach),
    })?)
}

struct CrossEntropy {
    labels: Vec<u32>,
}

/// Rows of a contiguous f32 `[n, v]` tensor's storage.
fn rows<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("cross-entropy: logits must be f32")
    };
    let (n, v) = layout.shape().dims2()?;
    if !layout.is_contiguous() {
        candle_core::bail!("cross-entropy: logits must be contiguous");
    }
    Ok((
        &data[layout.start_offset()..layout.start_offset() + n * v],
        v,
    ))
}

/// `exp(x)` for `x ≤ 0` in a form the compiler vectorises (Cephes' `expf`:
/// `x = n·ln 2 + r`, a degree-5 polynomial for `exp(r)`, `2ⁿ` from the
/// exponent bits; relative error about 2e-7). Inputs below −87 give 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `tanh(u)` from [`exp_nonpositive`] (vectorisable).
#[inline(always)]
fn tanh(u: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * u.abs());
    let t = (1.0 - e) / (1.0 + e);
    if u < 0.0 { -t } else { t }
}

const GELU_C: f32 = 0.797_884_6; // √(2/π)
const GELU_A: f32 = 0.044_715;

struct GeluTanh;

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 only")
    };
    if !layout.is_contiguous() {
        candle_core::bail!("{op}: the input must be contiguous");
    }
    Ok(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

#[inline(always)]
fn gelu_forward(x: &[f32], out: &mut [f32]) {
    for (y, &x) in out.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + tanh(GELU_C * (x + GELU_A * x * x * x)));
    }
}

#[inline(always)]
fn gelu_backward(x: &[f32], grad: &mut [f32]) {
    for (g, &x) in grad.iter_mut().zip(x) {
        let t = tanh(GELU_C * (x + GELU_A * x * x * x));
        *g *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_forward_avx2(x: &[f32], out: &mut [f32]) {
    gelu_forward(x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_backward_avx2(x: &[f32], grad: &mut [f32]) {
    gelu_backward(x, grad)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Splits the work over rayon in blocks of 16k elements.
fn par_blocks(x: &[f32], out: &mut [f32], f: impl Fn(&[f32], &mut [f32]) + Sync) {
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| f(x, o));
}

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "gelu-tanh")?;
        let mut out = vec![0f32; x.len()];
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            par_blocks(x, &mut out, |x, o| unsafe { gelu_forward_avx2(x, o) });
        } else {
            par_blocks(x, &mut out, gelu_forward);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut grad = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (storage, layout) = arg.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("gelu-tanh: not on the CPU")
        };
        let x = f32_slice(storage, layout, "gelu-tanh")?;
        let apply = |x: &[f32], g: &mut [f32]| {
            if has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { gelu_backward_avx2(x, g) }
            } else {
                gelu_backward(x, g)
            }
        };
        grad.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(g, x)| apply(x, g));
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

/// GPT-2's `gelu_new`, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, with
/// its analytic gradient; f32.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluTanh)?)
}

/// Softmax of one row of scores over keys `start..end`; the others get 0
/// (a row with no visible key, a padding query's, is all zeros).
#[inline(always)]
pub(super) fn causal_row(x: &[f32], out: &mut [f32], scale: f32, start: usize, end: usize) {
    out.iter_mut().for_each(|o| *o = 0.0);
    if start >= end {
        return;
    }
    let max = x[start..end]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
        * scale;
    let mut sum = 0f32;
    for (o, &v) in out[start..end].iter_mut().zip(&x[start..end]) {
        *o = exp_nonpositive(v * scale - max);
        sum += *o;
    }
    let inv = 1.0 / sum;
    out[start..end].iter_mut().for_each(|o| *o *= inv);
}

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/σ of a row.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer-norm")?;
        let (w, b) = (
            f32_slice(s2, l2, "layer-norm")?,
            f32_slice(s3, l3, "layer-norm")?,
        );
        let c = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(o, x)| {
                let (mean, inv) = moments(x, self.eps);
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                    *o = (x - mean) * inv * w + b;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.to_vec1::<f32>()?;
        let dy = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(c)
            .zip(xs.par_chunks(c))
            .zip(dy.par_chunks(c))
            .for_each(|((dx, x), dy)| {
                let (mean, inv) = moments(x, self.eps);
                let n = c as f32;
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for ((&x, &dy), &w) in x.iter().zip(dy).zip(&ws) {
                    let g = dy * w;
                    sum_g += g;
                    sum_gx += g * (x - mean) * inv;
                }
                for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(&ws) {
                    let xhat = (x - mean) * inv;
                    *dx = inv * (dy * w - sum_g / n - xhat * sum_gx / n);
                }
            });
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let trains = |t: &Tensor| t.is_variable() || t.track_op();
        if !trains(w) && !trains(b) {
            return Ok((Some(dx), None, None));
        }
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        for (x, dy) in xs.chunks(c).zip(dy.chunks(c)) {
            let (mean, inv) = moments(x, self.eps);
            for (((dw, db), &x), &dy) in dw.iter_mut().zip(db.iter_mut()).zip(x).zip(dy) {
                *dw += dy * (x - mean) * inv;
                *db += dy;
            }
        }
        Ok((
            Some(dx),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// LayerNorm over the last dimension (`x` `[.., c]`, `weight` and `bias`
/// `[c]`, f32), one node with an analytic backward.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )?)
}

struct RmsNormOp {
    eps: f32,
}

/// `1 / √(mean(x²) + ε)` of a row, summed in f64 as PyTorch's f32 mean is
/// accurate to.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    1.0 / ((mean as f32) + eps).sqrt()
}

impl candle_core::CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm")?;
        let w = f32_slice(s2, l2, "rms-norm")?;
        let c = w.len();
        if l1.dims().last() != Some(&c) {
            candle_core::bail!("rms-norm: input {:?} for a weight of {c}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(o, x)| {
                let inv = inv_rms(x, self.eps);
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = w * (x * inv);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.to_vec1::<f32>()?;
        let dy = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // y = w ⊙ x·r with r = (mean(x²) + ε)^(−1/2):
        // dx = r·(g − x̂·mean(g ⊙ x̂)) with g = dy ⊙ w and x̂ = x·r.
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(c)
            .zip(xs.par_chunks(c))
            .zip(dy.par_chunks(c))
            .for_each(|((dx, x), dy)| {
                let inv = inv_rms(x, self.eps);
                let dot = x
                    .iter()
                    .zip(dy)
                    .zip(&ws)
                    .map(|((&x, &dy), &w)| (dy * w * x * inv) as f64)
                    .sum::<f64>() as f32
                    / c as f32;
                for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(&ws) {
                    *dx = inv * (dy * w - x * inv * dot);
                }
            });
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        if !(w.is_variable() || w.track_op()) {
            return Ok((Some(dx), None));
        }
        let mut dw = vec![0f32; c];
        for (x, dy) in xs.chunks(c).zip(dy.chunks(c)) {
            let inv = inv_rms(x, self.eps);
            for ((dw, &x), &dy) in dw.iter_mut().zip(x).zip(dy) {
                *dw += dy * x * inv;
            }
        }
        Ok((Some(dx), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// RMSNorm over the last dimension, `w ⊙ x / √(mean(x²) + ε)` (`x` `[.., c]`,
/// `weight` `[c]`, f32), one node with an analytic backward.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })?)
}

/// `silu(gate) · up`, the gated MLP's activation.
struct SiluMul;

/// The logistic function from [`exp_nonpositive`], for any sign.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (
            f32_slice(s1, l1, "silu-mul")?,
            f32_slice(s2, l2, "silu-mul")?,
        );
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "silu-mul: gate {:?} and up {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14).zip(u.par_chunks(1 << 14)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = gate.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let u = up.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        const BLOCK: usize = 1 << 14;
        dg.par_chunks_mut(BLOCK)
            .zip(du.par_chunks_mut(BLOCK))
            .zip(
                g.par_chunks(BLOCK)
                    .zip(u.par_chunks(BLOCK))
                    .zip(dy.par_chunks(BLOCK)),
            )
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..g.len() {
                    let s = sigmoid(g[i]);
                    // d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    du[i] = dy[i] * g[i] * s;
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}

/// `silu(gate) ⊙ up` (f32, same shapes) with its analytic backward.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?)
}

/// `x · W + scale · ((x ⊙ mask) · Aᵀ) · Bᵀ`: a frozen linear layer with
/// its LoRA branch, one node of the graph (see [`lora_linear`]).
struct LoraLinear {
    /// `[in, out]`, frozen.
    weight: Tensor,
    /// `[out]`, frozen.
    bias: Option<Tensor>,
    scale: f64,
    /// The dropout mask on the LoRA branch's input (`0` or `1 / keep`), `x`'s shape.
    mask: Option<Tensor>,
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = self.weight.dims2()?;
        let (r, _) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&k)
            || !l1.is_contiguous()
            || l2.dims() != [r, k]
            || l3.dims() != [n, r]
        {
            candle_core::bail!(
                "lora-linear: input {:?}, A {:?}, B {:?} for a weight [{k}, {n}]",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let m = l1.shape().elem_count() / k;
        let x_layout = Layout::contiguous_with_offset((m, k), l1.start_offset());
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("lora-linear: the weight is not on the CPU")
        };
        let bias = bias_values(self.bias.as_ref(), n, "lora-linear")?;
        let mut y = f32_vec(s1.matmul(weight, (1, m, n, k), &x_layout, weight_layout)?)?;
        let masked;
        let (xd, xd_layout) = match &self.mask {
            Some(mask) => {
                let x = f32_slice(s1, l1, "lora-linear")?;
                let mask = mask.flatten_all()?.to_vec1::<f32>()?;
                masked = CpuStorage::F32(x.iter().zip(&mask).map(|(a, b)| a * b).collect());
                (&masked, Layout::contiguous((m, k)))
            }
            None => (s1, x_layout),
        };
        let u = xd.matmul(s2, (1, m, r, k), &xd_layout, &l2.transpose(0, 1)?)?;
        let v = f32_vec(u.matmul(
            s3,
            (1, m, n, r),
            &Layout::contiguous((m, r)),
            &l3.transpose(0, 1)?,
        )?)?;
        add_rows(&mut y, n, Some((&v, self.scale as f32)), bias.as_deref());
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, n) = self.weight.dims2()?;
        let g = grad_res.reshape(((), n))?;
        let flat = x.reshape(((), k))?;
        let xd = match &self.mask {
            Some(mask) => (&flat * mask.reshape(((), k))?)?,
            None => flat,
        };
        // g·B [m, r]; the branch's gradients through it.
        let gb = g.matmul(b)?;
        let mut through_lora = (gb.matmul(a)? * self.scale)?;
        if let Some(mask) = &self.mask {
            through_lora = (through_lora * mask.reshape(((), k))?)?;
        }
        // The input's gradient only where something before it trains (not
        // the first layer's input, computed from frozen embeddings).
        let dx = if x.track_op() {
            Some((g.matmul(&self.weight.t()?)? + through_lora)?.reshape(x.shape())?)
        } else {
            None
        };
        let da = (gb.t()?.matmul(&xd)? * self.scale)?;
        let db = (g.t()?.matmul(&xd.matmul(&a.t()?)?)? * self.scale)?;
        Ok((dx, Some(da), Some(db)))
    }
}

/// A frozen linear layer with LoRA in one node: `x · weight + scale ·
/// ((x ⊙ mask) · aᵀ) · bᵀ` (`x` `[.., in]`, `weight` `[in, out]` frozen, `a`
/// `[r, in]`, `b` `[out, r]`, `mask` the LoRA dropout's, `x`'s shape). The
/// gradients reach `x`, `a` and `b`; built from primitive ops the same
/// layer is seven nodes, each with a gradient backward allocates and adds.
pub fn lora_linear(
    x: &Tensor,
    (weight, bias): (&Tensor, Option<&Tensor>),
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let op = LoraLinear {
        weight: weight.detach(),
        bias: bias.map(Tensor::detach),
        scale,
        mask,
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

/// `[b, t, h·d]` → `[b, h, t, d]`, rotating each head by the position's
/// angles (queries and keys) or not (values); its backward merges back.
struct Heads {
    heads: usize,
    /// `(cos, sin)` `[b·t, d/2]` each, or no rotation.
    angles: Option<(Vec<f32>, Vec<f32>)>,
}

impl Heads {
    /// Split: `x` `[b, t, h, d]` in memory, out `[b, h, t, d]`, rotated.
    fn split(&self, x: &[f32], (t, d): (usize, usize)) -> Vec<f32> {
        let h = self.heads;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        // One output row per (b, head, position).
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            let (bi, rest) = (row / (h * t), row % (h * t));
            let (hi, ti) = (rest / t, rest % t);
            let src = &x[((bi * t + ti) * h + hi) * d..][..d];
            match &self.angles {
                Some((cos, sin)) => {
                    let p = bi * t + ti;
                    for j in 0..half {
                        let (c, s) = (cos[p * half + j], sin[p * half + j]);
                        o[j] = src[j] * c - src[j + half] * s;
                        o[j + half] = src[j + half] * c + src[j] * s;
                    }
                }
                None => o.copy_from_slice(src),
            }
        });
        out
    }

    /// The inverse of [`split`](Self::split): `x` `[b, h, t, d]` → `[b, t, h·d]`,
    /// rotated back (a rotation's transpose: −angle).
    fn merge(&self, x: &[f32], (t, d): (usize, usize)) -> Vec<f32> {
        let h = self.heads;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
            // Output row (b, position, head) reads input row (b, head, position).
            let (bi, rest) = (row / (t * h), row % (t * h));
            let (ti, hi) = (rest / h, rest % h);
            let src = &x[((bi * h + hi) * t + ti) * d..][..d];
            match &self.angles {
                Some((cos, sin)) => {
                    let p = bi * t + ti;
                    for j in 0..half {
                        let (c, s) = (cos[p * half + j], -sin[p * half + j]);
                        o[j] = src[j] * c - src[j + half] * s;
                        o[j + half] = src[j + half] * c + src[j] * s;
                    }
                }
                None => o.copy_from_slice(src),
            }
        });
        out
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "heads"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "heads")?;
        let (b, t, c) = layout.shape().dims3()?;
        let d = c / self.heads;
        if let Some((cos, _)) = &self.angles
            && cos.len() != b * t * (d / 2)
        {
            candle_core::bail!(
                "heads: {} angles for [{b}, {t}] positions of {d}",
                cos.len()
            );
        }
        Ok((
            CpuStorage::F32(self.split(x, (t, d))),
            Shape::from((b, self.heads, t, d)),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (_, t, c) = arg.dims3()?;
        Ok(Some(Tensor::from_vec(
            self.merge(&g, (t, c / self.heads)),
            arg.shape(),
            arg.device(),
        )?))
    }
}

/// `[b, t, h·d]` → `[b, h, t, d]` in one node, each head rotated by the
/// angles `positions[b·t] × inv_freq[d/2]` (times `scaling`) when
/// `inv_freq` is given: [`rope`] and the split of heads together.
pub fn split_heads(
    x: &Tensor,
    heads: usize,
    rotary: Option<(&[u32], &[f32], f32)>,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let d = c / heads;
    let angles = match rotary {
        Some((positions, inv_freq, scaling)) => {
            if positions.len() != b * t || inv_freq.len() != d / 2 {
                return Err(super::ModelError::Config(format!(
                    "rope: {} positions and {} frequencies for {:?}",
                    positions.len(),
                    inv_freq.len(),
                    x.dims()
                )));
            }
            let angles: Vec<f32> = positions
                .iter()
                .flat_map(|&p| inv_freq.iter().map(move |&f| f * p as f32))
                .collect();
            Some((
                angles.iter().map(|&a| a.cos() * scaling).collect(),
                angles.iter().map(|&a| a.sin() * scaling).collect(),
            ))
        }
        None => None,
    };
    Ok(x.contiguous()?.apply_op1(Heads { heads, angles })?)
}

/// The maximum of a row, eight lanes at a time.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    tail.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// Replaces each `x` of a row by `exp(x − shift)`; returns their sum.
#[inline(always)]
fn exp_in_place(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *x = exp_nonpositive(*x - shift);
            *lane += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - shift);
        sum += *x;
    }
    sum
}

/// `ln Σ exp(x)` over a row.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row_max(row);
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += exp_nonpositive(x - max);
        }
    }
    let sum: f32 =
        lanes.iter().sum::<f32>() + tail.iter().map(|&x| exp_nonpositive(x - max)).sum::<f32>();
    max + sum.ln()
}

/// Turns a row of logits into its loss gradient, `(softmax − onehot) · scale`,
/// in place; returns the row's loss. Uses AVX2 and FMA where the CPU has them.
fn loss_and_gradient(row: &mut [f32], label: usize, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { loss_and_gradient_avx2(row, label, scale) };
    }
    loss_and_gradient_generic(row, label, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn loss_and_gradient_avx2(row: &mut [f32], label: usize, scale: f32) -> f32 {
    loss_and_gradient_generic(row, label, scale)
}

#[inline(always)]
fn loss_and_gradient_generic(row: &mut [f32], label: usize, scale: f32) -> f32 {
    let max = row_max(row);
    let picked = row[label];
    let sum = exp_in_place(row, max);
    let factor = scale / sum;
    for x in row.iter_mut() {
        *x *= factor;
    }
    row[label] -= scale;
    max + sum.ln() - picked
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, v) = rows(storage, layout)?;
        if data.len() / v != self.labels.len() {
            candle_core::bail!(
                "cross-entropy: {} rows of logits for {} labels",
                data.len() / v,
                self.labels.len()
            );
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l as usize >= v) {
            candle_core::bail!("cross-entropy: label {bad} is outside the vocabulary of {v}");
        }
        let total: f64 = data
            .par_chunks(v)
            .zip(&self.labels)
            .map(|(row, &label)| (log_sum_exp(row) - row[label as usize]) as f64)
            .sum();
        let mean = (total / self.labels.len().max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let scale =
            grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? / self.labels.len().max(1) as f32;
        let (storage, layout) = arg.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("cross-entropy: logits are not on the CPU")
        };
        let (data, v) = rows(storage, layout)?;
        let mut grad = data.to_vec();
        grad.par_chunks_mut(v)
            .zip(&self.labels)
            .for_each(|(row, &label)| {
                loss_and_gradient(row, label as usize, scale);
            });
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

struct LinearCrossEntropy {
    /// `[vocab, width]`, contiguous, frozen.
    weight: Tensor,
    /// Rows of the head replaced by the op's second argument (trainable
    /// tokens); the weight's rows there are zero.
    indices: Vec<u32>,
    labels: Vec<u32>,
    /// Whether forward computes the gradients for backward.
    need_grad: bool,
    /// `d loss / d hidden` and `d loss / d rows` for a unit output gradient.
    grads: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

/// Rows of logits computed at once: about 64 MB of them.
const CHUNK_ELEMENTS: usize = 16 << 20;

fn f32_vec(storage: CpuStorage) -> candle_core::Result<Vec<f32>> {
    match storage {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("linear-cross-entropy: f32 only"),
    }
}

impl LinearCrossEntropy {
    /// The loss; with `need_grad`, the gradients kept for backward.
    fn run(
        &self,
        hidden: &CpuStorage,
        layout: &Layout,
        rows: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, width) = layout.shape().dims2()?;
        let (vocab, _) = self.weight.dims2()?;
        let k = self.indices.len();
        if !layout.is_contiguous() || n != self.labels.len() {
            candle_core::bail!(
                "linear-cross-entropy: hidden {:?} for {} labels",
                layout.dims(),
                self.labels.len()
            );
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l as usize >= vocab) {
            candle_core::bail!("cross-entropy: label {bad} is outside the vocabulary of {vocab}");
        }
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("linear-cross-entropy: the weight is not on the CPU")
        };
        let weight_t_layout = weight_layout.transpose(0, 1)?;
        let scale = 1.0 / n.max(1) as f32;
        let chunk = (CHUNK_ELEMENTS / vocab).max(1);
        let mut total = 0f64;
        let mut grad_hidden = if self.need_grad {
            Vec::with_capacity(n * width)
        } else {
            Vec::new()
        };
        let mut grad_rows = vec![0f32; if self.need_grad { k * width } else { 0 }];
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            let lhs =
                Layout::contiguous_with_offset((m, width), layout.start_offset() + start * width);
            let mut logits =
                f32_vec(hidden.matmul(weight, (1, m, vocab, width), &lhs, &weight_t_layout)?)?;
            if let Some((rows, rows_layout)) = rows {
                // The replaced rows' logits: hidden · rowsᵀ into their columns.
                let part = f32_vec(hidden.matmul(
                    rows,
                    (1, m, k, width),
                    &lhs,
                    &rows_layout.transpose(0, 1)?,
                )?)?;
                for (r, values) in part.chunks(k.max(1)).enumerate().take(m) {
                    for (&column, &v) in self.indices.iter().zip(values) {
                        logits[r * vocab + column as usize] = v;
                    }
                }
            }
            let labels = &self.labels[start..start + m];
            total += logits
                .par_chunks_mut(vocab)
                .zip(labels)
                .map(|(row, &label)| loss_and_gradient(row, label as usize, scale) as f64)
                .sum::<f64>();
            if !self.need_grad {
                continue;
            }
            let gathered: Vec<f32> = logits
                .chunks(vocab)
                .flat_map(|row| self.indices.iter().map(move |&c| row[c as usize]))
                .collect();
            let g = CpuStorage::F32(logits);
            let mut part = f32_vec(g.matmul(
                weight,
                (1, m, width, vocab),
                &Layout::contiguous((m, vocab)),
                weight_layout,
            )?)?;
            if let Some((rows, rows_layout)) = rows {
                let g_rows = CpuStorage::F32(gathered);
                let g_layout = Layout::contiguous((m, k));
                // d hidden += G[:, indices] · rows; d rows += G[:, indices]ᵀ · hidden.
                let more =
                    f32_vec(g_rows.matmul(rows, (1, m, width, k), &g_layout, rows_layout)?)?;
                part.iter_mut().zip(&more).for_each(|(a, b)| *a += b);
                let d_rows = f32_vec(g_rows.matmul(
                    hidden,
                    (1, k, width, m),
                    &g_layout.transpose(0, 1)?,
                    &lhs,
                )?)?;
                grad_rows.iter_mut().zip(&d_rows).for_each(|(a, b)| *a += b);
            }
            grad_hidden.extend_from_slice(&part);
        }
        if self.need_grad {
            *self.grads.lock().expect("gradient lock") = Some((grad_hidden, grad_rows));
        }
        Ok((
            CpuStorage::F32(vec![(total * scale as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn take_grads(&self) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        match self.grads.lock().expect("gradient lock").take() {
            Some(grads) => Ok(grads),
            None => candle_core::bail!(
                "linear-cross-entropy: backward ran twice, or forward kept no gradient"
            ),
        }
    }
}

fn scaled(grad: Vec<f32>, like: &Tensor, grad_res: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(grad, like.shape(), like.device())?
        .broadcast_mul(&grad_res.to_dtype(DType::F32)?)
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(storage, layout, None)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(scaled(self.take_grads()?.0, arg, grad_res)?))
    }
}

impl candle_core::CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear-cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if !l2.is_contiguous() || l2.dims() != [self.indices.len(), l1.dims()[1]] {
            candle_core::bail!(
                "linear-cross-entropy: rows {:?} for {} indices",
                l2.dims(),
                self.indices.len()
            );
        }
        self.run(s1, l1, Some((s2, l2)))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (hidden, rows) = self.take_grads()?;
        Ok((
            Some(scaled(hidden, arg1, grad_res)?),
            Some(scaled(rows, arg2, grad_res)?),
        ))
    }
}

impl LinearCrossEntropy {
    fn new(
        hidden: &Tensor,
        weight: &Tensor,
        indices: Vec<u32>,
        rows: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<Self> {
        Ok(LinearCrossEntropy {
            weight: weight.detach().contiguous()?,
            indices,
            labels: labels.to_vec1::<u32>()?,
            need_grad: hidden.track_op() || rows.is_some_and(Tensor::track_op),
            grads: std::sync::Mutex::new(None),
        })
    }
}

/// Mean cross-entropy of the logits `hidden · weightᵀ` (`hidden` `[n,
/// width]` f32, `weight` `[vocab, width]`, frozen) against `labels` `[n]`,
/// without keeping the logits: forward computes them a chunk of rows at a
/// time, and when `hidden` takes part in backpropagation, turns each chunk
/// into its gradient and multiplies it back through the weight at once, so
/// backward only scales the stored `[n, width]` result.
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let op = LinearCrossEntropy::new(hidden, weight, Vec::new(), None, labels)?;
    Ok(hidden.contiguous()?.apply_op1(op)?)
}

/// [`linear_cross_entropy`] with the head's rows `indices` replaced by
/// `rows` `[indices.len(), width]`, which get their gradient too (`weight`
/// must be zero at those rows).
pub fn linear_cross_entropy_rows(
    hidden: &Tensor,
    weight: &Tensor,
    indices: &[u32],
    rows: &Tensor,
    labels: &Tensor,
) -> Result<Tensor> {
    let op = LinearCrossEntropy::new(hidden, weight, indices.to_vec(), Some(rows), labels)?;
    Ok(hidden.contiguous()?.apply_op2(&rows.contiguous()?, op)?)
}

/// Mean next-token cross-entropy: `logits` `[n, vocab]` (f32), `labels` `[n]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels = labels.to_vec1::<u32>()?;
    Ok(logits.contiguous()?.apply_op1(CrossEntropy { labels })?)
}

/// The same loss from primitive ops (the reference the fused op is tested against).
pub fn cross_entropy_reference(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(candle_core::D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(candle_core::D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::model::rng::Rng;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn gelu_tanh_matches_candles_with_gradient() {
        let mut rng = Rng::new(6);
        let x = Var::from_tensor(&rng.tensor(&[3, 40_001], |r| r.normal() * 3.0).unwrap()).unwrap();
        let ours = gelu_tanh(x.as_tensor()).unwrap();
        let candle = x.as_tensor().gelu().unwrap();
        assert!(max_abs(&ours, &candle) < 1e-5);
        let weights = rng.tensor(&[3, 40_001], |r| r.normal()).unwrap();
        let g1 = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&candle * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4);
    }

    #[test]
    fn layer_norm_matches_the_primitive_ops_with_gradients() {
        let mut rng = Rng::new(8);
        let x = Var::from_tensor(&rng.tensor(&[3, 4, 24], |r| r.normal() * 2.0 + 1.0).unwrap())
            .unwrap();
        let w = Var::from_tensor(&rng.tensor(&[24], |r| r.normal()).unwrap()).unwrap();
        let b = Var::from_tensor(&rng.tensor(&[24], |r| r.normal()).unwrap()).unwrap();
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let mean = x.as_tensor().mean_keepdim(candle_core::D::Minus1).unwrap();
        let centered = x.as_tensor().broadcast_sub(&mean).unwrap();
        let var = centered
            .sqr()
            .unwrap()
            .mean_keepdim(candle_core::D::Minus1)
            .unwrap();
        let reference = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(max_abs(&ours, &reference) < 1e-5);
        let weights = rng.tensor(&[3, 4, 24], |r| r.normal()).unwrap();
        let g1 = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &w, &b] {
            assert!(max_abs(g1.get(var).unwrap(), g2.get(var).unwrap()) < 1e-4);
        }
    }

    /// The gradient of `sum(f(x) ⊙ weights)` with respect to `x` by central
    /// finite differences in f64 (of the op run in f32), at a few entries.
    fn finite_difference(
        f: &dyn Fn(&Tensor) -> Tensor,
        x: &Tensor,
        weights: &Tensor,
        entries: &[usize],
    ) -> Vec<f64> {
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let objective = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), x.shape(), &Device::Cpu).unwrap();
            let y = f(&t).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            y.iter()
                .zip(weights.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(|(a, b)| *a as f64 * b as f64)
                .sum()
        };
        entries
            .iter()
            .map(|&i| {
                let h = 1e-2f32;
                let (mut up, mut down) = (values.clone(), values.clone());
                up[i] += h;
                down[i] -= h;
                (objective(&up) - objective(&down)) / (2.0 * h as f64)
            })
            .collect()
    }

    fn check_fd(name: &str, analytic: &Tensor, numeric: &[f64], entries: &[usize]) {
        let analytic = analytic.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (&i, &n) in entries.iter().zip(numeric) {
            let a = analytic[i] as f64;
            assert!(
                (a - n).abs() < 2e-3 * (1.0 + n.abs()),
                "{name}: entry {i}: analytic {a}, finite difference {n}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_the_primitive_ops_and_finite_differences() {
        let mut rng = Rng::new(11);
        let x = Var::from_tensor(&rng.tensor(&[3, 5, 24], |r| r.normal() * 2.0 + 0.5).unwrap())
            .unwrap();
        let w = Var::from_tensor(&rng.tensor(&[24], |r| r.normal()).unwrap()).unwrap();
        let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let variance = x
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_keepdim(candle_core::D::Minus1)
            .unwrap();
        let reference = x
            .as_tensor()
            .broadcast_div(&(variance + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap();
        assert!(max_abs(&ours, &reference) < 1e-5);
        let weights = rng.tensor(&[3, 5, 24], |r| r.normal()).unwrap();
        let g1 = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &w] {
            assert!(max_abs(g1.get(var).unwrap(), g2.get(var).unwrap()) < 1e-4);
        }
        let entries = [0, 7, 100, 359];
        let w_now = w.as_tensor().detach();
        let numeric = finite_difference(
            &|t| rms_norm(t, &w_now, 1e-5).unwrap(),
            x.as_tensor(),
            &weights,
            &entries,
        );
        check_fd("rms-norm dx", g1.get(&x).unwrap(), &numeric, &entries);
        // Frozen weight: only the input's gradient.
        let frozen = rms_norm(x.as_tensor(), &w_now, 1e-5)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(frozen.get(&x).is_some());
    }

    #[test]
    fn split_heads_with_rope_matches_rotate_half_and_finite_differences() {
        let mut rng = Rng::new(12);
        let (b, h, t, d) = (2, 3, 4, 8);
        let x = Var::from_tensor(&rng.tensor(&[b, t, h * d], |r| r.normal()).unwrap()).unwrap();
        // Row 0 left-padded by one, row 1 after two cached positions.
        let positions = [0u32, 0, 1, 2, 2, 3, 4, 5];
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let ours = split_heads(x.as_tensor(), h, Some((&positions, &inv_freq, 1.0))).unwrap();
        // transformers: view as heads, transpose, then x·cos + rotate_half(x)·sin
        // with cos and sin of cat(freqs, freqs).
        let freq = &inv_freq;
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..d).map(move |j| p as f32 * freq[j % (d / 2)]))
            .collect();
        let angles = Tensor::from_vec(angles, (b, 1, t, d), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let xt = x
            .as_tensor()
            .reshape((b, t, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let rotated = Tensor::cat(
            &[
                &xt.narrow(3, d / 2, d / 2).unwrap().neg().unwrap(),
                &xt.narrow(3, 0, d / 2).unwrap(),
            ],
            3,
        )
        .unwrap();
        let reference =
            (xt.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
        assert!(max_abs(&ours, &reference) < 1e-5);
        let weights = rng.tensor(&[b, h, t, d], |r| r.normal()).unwrap();
        let g1 = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);
        let entries = [0, 5, 37, 100, 191];
        let numeric = finite_difference(
            &|t| split_heads(t, h, Some((&positions, &inv_freq, 1.0))).unwrap(),
            x.as_tensor(),
            &weights,
            &entries,
        );
        check_fd("split-heads dx", g1.get(&x).unwrap(), &numeric, &entries);
        // Without rotation, a transpose, and its gradient the transpose back.
        let plain = split_heads(x.as_tensor(), h, None).unwrap();
        let transposed = x
            .as_tensor()
            .reshape((b, t, h, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert_eq!(max_abs(&plain, &transposed), 0.0);
        let grad = (&plain * &transposed.detach())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(max_abs(grad.get(&x).unwrap(), &x.as_tensor().detach()), 0.0);
    }

    #[test]
    fn lora_linear_matches_the_primitive_ops_with_gradients() {
        let mut rng = Rng::new(15);
        let x = Var::from_tensor(&rng.tensor(&[2, 5, 12], |r| r.normal()).unwrap()).unwrap();
        let w = rng.tensor(&[12, 7], |r| r.normal()).unwrap();
        let a = Var::from_tensor(&rng.tensor(&[3, 12], |r| r.normal()).unwrap()).unwrap();
        let b = Var::from_tensor(&rng.tensor(&[7, 3], |r| r.normal()).unwrap()).unwrap();
        let weights = rng.tensor(&[2, 5, 7], |r| r.normal()).unwrap();
        let bias = rng.tensor(&[7], |r| r.normal()).unwrap();
        let masks = [
            None,
            Some(
                rng.tensor(&[2, 5, 12], |r| if r.uniform() < 0.8 { 1.25 } else { 0.0 })
                    .unwrap(),
            ),
        ];
        for (mask, bias) in masks.iter().flat_map(|m| [(m, None), (m, Some(&bias))]) {
            let ours = lora_linear(
                x.as_tensor(),
                (&w, bias),
                a.as_tensor(),
                b.as_tensor(),
                2.0,
                mask.clone(),
            )
            .unwrap();
            let xd = match &mask {
                Some(m) => (x.as_tensor() * m).unwrap(),
                None => x.as_tensor().clone(),
            };
            let flat = |t: &Tensor| t.reshape((10, 12)).unwrap();
            let branch = flat(&xd)
                .matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .matmul(&b.as_tensor().t().unwrap())
                .unwrap();
            let mut reference =
                (flat(x.as_tensor()).matmul(&w).unwrap() + (branch * 2.0).unwrap()).unwrap();
            if let Some(bias) = bias {
                reference = reference.broadcast_add(bias).unwrap();
            }
            let reference = reference.reshape((2, 5, 7)).unwrap();
            assert!(max_abs(&ours, &reference) < 1e-4);
            let g1 = (&ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&reference * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for var in [&x, &a, &b] {
                assert!(max_abs(g1.get(var).unwrap(), g2.get(var).unwrap()) < 1e-4);
            }
            // A frozen layer with its bias, without LoRA.
            let frozen = frozen_linear(x.as_tensor(), &w, bias).unwrap();
            let mut plain = x
                .as_tensor()
                .matmul(&w.unsqueeze(0).unwrap().broadcast_as((2, 12, 7)).unwrap())
                .unwrap();
            if let Some(bias) = bias {
                plain = plain.broadcast_add(bias).unwrap();
            }
            assert!(max_abs(&frozen, &plain) < 1e-4);
        }
        // An input computed from nothing that trains gets no gradient.
        let constant = x.as_tensor().detach();
        let out = lora_linear(
            &constant,
            (&w, None),
            a.as_tensor(),
            b.as_tensor(),
            2.0,
            None,
        )
        .unwrap();
        let grads = (&out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&constant).is_none() && grads.get(a.as_tensor()).is_some());
    }

    #[test]
    fn silu_gate_matches_the_primitive_ops_and_finite_differences() {
        let mut rng = Rng::new(13);
        let gate =
            Var::from_tensor(&rng.tensor(&[3, 40_001], |r| r.normal() * 4.0).unwrap()).unwrap();
        let up = Var::from_tensor(&rng.tensor(&[3, 40_001], |r| r.normal()).unwrap()).unwrap();
        let ours = silu_mul(gate.as_tensor(), up.as_tensor()).unwrap();
        let g = gate.as_tensor();
        let sigmoid = (g.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap();
        let reference = (g * sigmoid).unwrap().mul(up.as_tensor()).unwrap();
        assert!(max_abs(&ours, &reference) < 1e-5);
        let weights = rng.tensor(&[3, 40_001], |r| r.normal()).unwrap();
        let g1 = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&gate, &up] {
            assert!(max_abs(g1.get(var).unwrap(), g2.get(var).unwrap()) < 1e-4);
        }
        let entries = [0, 17, 40_000, 80_123, 120_002];
        let up_now = up.as_tensor().detach();
        let numeric = finite_difference(
            &|t| silu_mul(t, &up_now).unwrap(),
            gate.as_tensor(),
            &weights,
            &entries,
        );
        check_fd(
            "silu-mul d gate",
            g1.get(&gate).unwrap(),
            &numeric,
            &entries,
        );
    }

    #[test]
    fn the_vectorised_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (ours, libm) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn fused_cross_entropy_equals_the_primitive_ops_with_gradient() {
        let mut rng = Rng::new(3);
        let logits =
            Var::from_tensor(&rng.tensor(&[37, 101], |r| r.normal() * 4.0).unwrap()).unwrap();
        let labels = Tensor::new(
            (0..37u32).map(|i| (i * 7) % 101).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let fused = cross_entropy(logits.as_tensor(), &labels).unwrap();
        let reference = cross_entropy_reference(logits.as_tensor(), &labels).unwrap();
        assert!(max_abs(&fused, &reference) < 1e-5);
        let g1 = (&fused * 3.0).unwrap().backward().unwrap();
        let g2 = (&reference * 3.0).unwrap().backward().unwrap();
        assert!(max_abs(g1.get(&logits).unwrap(), g2.get(&logits).unwrap()) < 1e-6);
    }

    #[test]
    fn linear_cross_entropy_equals_matmul_then_loss_with_gradient() {
        let mut rng = Rng::new(5);
        let hidden = Var::from_tensor(&rng.tensor(&[23, 16], |r| r.normal()).unwrap()).unwrap();
        let weight = rng.tensor(&[301, 16], |r| r.normal()).unwrap();
        let labels = Tensor::new(
            (0..23u32).map(|i| (i * 13) % 301).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let fused = linear_cross_entropy(hidden.as_tensor(), &weight, &labels).unwrap();
        let reference = cross_entropy_reference(
            &hidden.as_tensor().matmul(&weight.t().unwrap()).unwrap(),
            &labels,
        )
        .unwrap();
        assert!(max_abs(&fused, &reference) < 1e-5);
        let g1 = (&fused * 2.0).unwrap().backward().unwrap();
        let g2 = (&reference * 2.0).unwrap().backward().unwrap();
        assert!(max_abs(g1.get(&hidden).unwrap(), g2.get(&hidden).unwrap()) < 1e-5);
        // Without gradients (evaluation) the value is the same.
        let value = linear_cross_entropy(&hidden.as_tensor().detach(), &weight, &labels).unwrap();
        assert!(max_abs(&value, &reference) < 1e-5);
    }

    #[test]
    fn linear_cross_entropy_with_replaced_rows_gives_both_gradients() {
        let mut rng = Rng::new(7);
        let hidden = Var::from_tensor(&rng.tensor(&[19, 16], |r| r.normal()).unwrap()).unwrap();
        let weight = rng.tensor(&[301, 16], |r| r.normal()).unwrap();
        let indices = [3u32, 150, 299, 41];
        let rows = Var::from_tensor(&rng.tensor(&[4, 16], |r| r.normal()).unwrap()).unwrap();
        let labels = Tensor::new(
            (0..19u32)
                .map(|i| [3u32, 150, 7, 299, 41][i as usize % 5])
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        let index = Tensor::new(&indices, &Device::Cpu).unwrap();
        let mut keep = vec![1f32; 301];
        indices.iter().for_each(|&i| keep[i as usize] = 0.0);
        let masked = weight
            .broadcast_mul(&Tensor::from_vec(keep, (301, 1), &Device::Cpu).unwrap())
            .unwrap();
        let fused = linear_cross_entropy_rows(
            hidden.as_tensor(),
            &masked,
            &indices,
            rows.as_tensor(),
            &labels,
        )
        .unwrap();
        let full = masked.index_add(&index, rows.as_tensor(), 0).unwrap();
        let reference = cross_entropy_reference(
            &hidden.as_tensor().matmul(&full.t().unwrap()).unwrap(),
            &labels,
        )
        .unwrap();
        assert!(max_abs(&fused, &reference) < 1e-5);
        let g1 = fused.backward().unwrap();
        let g2 = reference.backward().unwrap();
        assert!(max_abs(g1.get(&hidden).unwrap(), g2.get(&hidden).unwrap()) < 1e-5);
        assert!(max_abs(g1.get(&rows).unwrap(), g2.get(&rows).unwrap()) < 1e-5);
    }

    #[test]
    fn frozen_matmul_gives_the_input_gradient_only() {
        let mut rng = Rng::new(4);
        let x = Var::from_tensor(&rng.tensor(&[2, 5, 8], |r| r.normal()).unwrap()).unwrap();
        let w = rng.tensor(&[6, 8], |r| r.normal()).unwrap();
        let target = rng.tensor(&[2, 5, 6], |r| r.normal()).unwrap();
        // A transposed view, as the tied head passes it.
        let frozen = frozen_matmul(x.as_tensor(), &w.t().unwrap()).unwrap();
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_abs(&frozen, &plain) < 1e-5);
        let loss = |y: &Tensor| (y * &target).unwrap().sum_all().unwrap();
        let g1 = loss(&frozen).backward().unwrap();
        let g2 = loss(&plain).backward().unwrap();
        assert!(max_abs(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-5);
        assert!(g1.get(&w).is_none());
    }
}
