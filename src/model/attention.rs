//! Causal self-attention, `softmax(scale · Q·Kᵀ + mask) · V`, as one op with
//! an analytic backward (the form of FlashAttention's backward, with the
//! probabilities kept from the forward instead of recomputed).
//!
//! Built from candle's primitives, attention was two batched matmuls, a
//! softmax and the copies that split and merge heads: each batched matmul
//! runs `batch · heads` small GEMMs one after another, each spread over
//! every thread, at 40-45 GFLOP/s where one large GEMM runs at 250-350
//! (GPT-2 small, 96 GEMMs of 128 x 128 x 64 per matmul, 2 threads); the
//! backward ran four more, and every node kept a buffer and a gradient. Here
//! each batch row is one task on rayon's pool and its GEMMs run on that
//! thread, reading queries, keys and values in place (strided) and writing
//! the output already merged, `[b, t, heads · d]`.
//!
//! Two entry points share the kernel: [`attention_packed`] takes GPT-2's
//! fused projection `[b, t, (h + 2·kv) · d]` as it comes out of `c_attn`;
//! [`attention`] takes queries `[b, h, t, d]` and keys and values
//! `[b, kv, s, d]` (Llama's, rotated and appended to the KV cache). Query
//! head `i` reads key-value head `i / (h / kv)` (grouped-query attention).
//! Query `i` of `t` sees keys `pad..=past + i` (`s = past + t`), `pad` being
//! its batch row's left padding; a query that sees none (a padding
//! position's) gets zeros.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::Result;
use super::layers::RowLayout;

/// Where one batch row keeps its heads: element `(head, position, e)` of
/// the row's slice is at `offset + head · head_stride + position · row`.
#[derive(Debug, Clone, Copy)]
struct Heads {
    offset: usize,
    head_stride: usize,
    row: usize,
}

impl Heads {
    /// Heads side by side in each position's row: `[t, n · d]` (or a
    /// column block of a wider row).
    fn interleaved(offset: usize, d: usize, row: usize) -> Self {
        Heads {
            offset,
            head_stride: d,
            row,
        }
    }

    /// Heads one after another: `[n, t, d]`.
    fn stacked(t: usize, d: usize) -> Self {
        Heads {
            offset: 0,
            head_stride: t * d,
            row: d,
        }
    }

    /// One past the last element `n` heads of `t` positions reach.
    fn end(&self, n: usize, t: usize, d: usize) -> usize {
        if n == 0 || t == 0 {
            0
        } else {
            self.offset + (n - 1) * self.head_stride + (t - 1) * self.row + d
        }
    }

    fn at(&self, head: usize) -> usize {
        self.offset + head * self.head_stride
    }
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    /// Queries.
    t: usize,
    /// Keys: `past + t`.
    s: usize,
    d: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn past(&self) -> usize {
        self.s - self.t
    }
}

/// `dst (m x n, row stride dst_rs) (+)= lhs · rhs` on this thread, every
/// operand a strided view: `(pointer, row stride, column stride)`.
///
/// # Safety
/// Every element the views reach is inside the allocation its pointer
/// points into, and `dst` overlaps neither input.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the caller's contract; `gemm` reads `m x k` and `k x n`
    // elements of the inputs and writes `m x n` of `dst` through these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The keys query `i` of batch row `b` sees: `start..end`, from its
/// sequence's start (or the row's padding) through itself.
fn visible(dims: &Dims, rows: &RowLayout, b: usize, i: usize) -> (usize, usize) {
    let j = dims.past() + i;
    (rows.start(b, j), (j + 1).min(dims.s))
}

/// One batch row's forward: its probabilities `[h, t, s]` and its output
/// `[t, h · d]`, from its queries, keys and values.
fn forward_row(
    dims: &Dims,
    (scale, rows, b): (f32, &RowLayout, usize),
    [(q, qh), (k, kh), (v, vh)]: [(&[f32], Heads); 3],
    probs: &mut [f32],
    out: &mut [f32],
) {
    let Dims { heads, t, s, d, .. } = *dims;
    let group = dims.group();
    let mut scores = vec![0f32; t * s];
    for head in 0..heads {
        let kv = head / group;
        let p = &mut probs[head * t * s..(head + 1) * t * s];
        // SAFETY: `check_views` bounded every view by its slice; `scores`
        // is t x s and `out` t x (heads · d) with this head's d columns.
        unsafe {
            gemm(
                t,
                s,
                d,
                scores.as_mut_ptr(),
                s,
                false,
                (q[qh.at(head)..].as_ptr(), qh.row, 1),
                (k[kh.at(kv)..].as_ptr(), 1, kh.row),
            );
        }
        for i in 0..t {
            let (start, end) = visible(dims, rows, b, i);
            super::ops::causal_row(
                &scores[i * s..(i + 1) * s],
                &mut p[i * s..(i + 1) * s],
                scale,
                start,
                end,
            );
        }
        unsafe {
            gemm(
                t,
                d,
                s,
                out[head * d..].as_mut_ptr(),
                heads * d,
                false,
                (p.as_ptr(), s, 1),
                (v[vh.at(kv)..].as_ptr(), vh.row, 1),
            );
        }
    }
}

/// One batch row's backward: the gradients of its queries, keys and values
/// (added into `dq`, `dk`, `dv`, zero on entry, laid out as `qh`, `kh`, `vh`)
/// from the output's `dout` `[t, h · d]`.
fn backward_row(
    dims: &Dims,
    scale: f32,
    [(q, qh), (k, kh), (v, vh)]: [(*const f32, Heads); 3],
    probs: &[f32],
    dout: &[f32],
    (dq, dk, dv): (*mut f32, *mut f32, *mut f32),
) {
    let Dims { heads, t, s, d, .. } = *dims;
    let group = dims.group();
    let mut ds = vec![0f32; t * s];
    for head in 0..heads {
        let kv = head / group;
        let p = &probs[head * t * s..(head + 1) * t * s];
        let dout_head = (dout[head * d..].as_ptr(), heads * d, 1);
        // SAFETY: the pointers are this batch row's slices, bounded by
        // `check_views`; `ds` is t x s; the gradient views of different
        // heads do not overlap, and no gradient overlaps an input.
        unsafe {
            // dV += Pᵀ · dO.
            gemm(
                s,
                d,
                t,
                dv.add(vh.at(kv)),
                vh.row,
                true,
                (p.as_ptr(), 1, s),
                dout_head,
            );
            // dP = dO · Vᵀ.
            gemm(
                t,
                s,
                d,
                ds.as_mut_ptr(),
                s,
                false,
                dout_head,
                (v.add(vh.at(kv)), 1, vh.row),
            );
        }
        // dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)).
        for (g, y) in ds.chunks_mut(s).zip(p.chunks(s)) {
            let dot: f32 = g.iter().zip(y).map(|(a, b)| a * b).sum();
            g.iter_mut()
                .zip(y)
                .for_each(|(g, &y)| *g = scale * y * (*g - dot));
        }
        unsafe {
            // dQ = dS · K; dK += dSᵀ · Q.
            gemm(
                t,
                d,
                s,
                dq.add(qh.at(head)),
                qh.row,
                true,
                (ds.as_ptr(), s, 1),
                (k.add(kh.at(kv)), kh.row, 1),
            );
            gemm(
                s,
                d,
                t,
                dk.add(kh.at(kv)),
                kh.row,
                true,
                (ds.as_ptr(), 1, s),
                (q.add(qh.at(head)), qh.row, 1),
            );
        }
    }
}

/// The layout of one call's inputs.
#[derive(Debug, Clone, Copy)]
enum Inputs {
    /// One tensor `[b, t, (h + 2·kv) · d]`: queries, keys, values side by side.
    Packed,
    /// Three tensors: `[b, h, t, d]`, `[b, kv, s, d]`, `[b, kv, s, d]`.
    Separate,
}

struct Attention {
    dims: Dims,
    inputs: Inputs,
    scale: f32,
    rows: RowLayout,
    /// The forward's probabilities `[b, h, t, s]`, for backward.
    probs: Mutex<Option<Vec<f32>>>,
}

fn f32_data<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("attention: {what} is not f32")
    };
    if !layout.is_contiguous() {
        candle_core::bail!("attention: {what} {:?} is not contiguous", layout.dims());
    }
    Ok(&data[layout.start_offset()..layout.start_offset() + layout.shape().elem_count()])
}

/// The f32 data of a tensor on the CPU, read in place through its storage guard.
fn borrowed<'a>(
    guard: &'a (candle_core::StorageRef<'_>, &Layout),
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(storage) = &*guard.0 else {
        candle_core::bail!("attention: {what} is not on the CPU")
    };
    f32_data(storage, guard.1, what)
}

fn batch_row(x: &[f32], b: usize, len: usize) -> &[f32] {
    &x[b * len..(b + 1) * len]
}

impl Attention {
    /// Per batch row: its slice length and the views of queries, keys and
    /// values in it (for `Packed`, one slice holds all three).
    fn views(&self) -> ([usize; 3], [Heads; 3]) {
        let Dims {
            heads,
            kv_heads,
            t,
            s,
            d,
            ..
        } = self.dims;
        match self.inputs {
            Inputs::Packed => {
                let row = (heads + 2 * kv_heads) * d;
                let len = t * row;
                (
                    [len; 3],
                    [
                        Heads::interleaved(0, d, row),
                        Heads::interleaved(heads * d, d, row),
                        Heads::interleaved((heads + kv_heads) * d, d, row),
                    ],
                )
            }
            Inputs::Separate => (
                [heads * t * d, kv_heads * s * d, kv_heads * s * d],
                [
                    Heads::stacked(t, d),
                    Heads::stacked(s, d),
                    Heads::stacked(s, d),
                ],
            ),
        }
    }

    /// Every view stays inside its batch row's slice.
    fn check_views(&self) -> candle_core::Result<()> {
        let Dims {
            heads,
            kv_heads,
            t,
            s,
            d,
            ..
        } = self.dims;
        let (lens, [qh, kh, vh]) = self.views();
        if qh.end(heads, t, d) > lens[0]
            || kh.end(kv_heads, s, d) > lens[1]
            || vh.end(kv_heads, s, d) > lens[2]
        {
            candle_core::bail!("attention: views outside their rows for {:?}", self.dims);
        }
        Ok(())
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims {
            batch,
            heads,
            t,
            s,
            d,
            ..
        } = self.dims;
        self.check_views()?;
        let (lens, [qh, kh, vh]) = self.views();
        if q.len() != batch * lens[0] || k.len() != batch * lens[1] || v.len() != batch * lens[2] {
            candle_core::bail!(
                "attention: inputs of {}, {}, {} elements for {:?}",
                q.len(),
                k.len(),
                v.len(),
                self.dims
            );
        }
        let mut out = vec![0f32; batch * t * heads * d];
        let mut probs = vec![0f32; batch * heads * t * s];
        out.par_chunks_mut((t * heads * d).max(1))
            .zip(probs.par_chunks_mut((heads * t * s).max(1)))
            .enumerate()
            .for_each(|(b, (out, probs))| {
                let inputs = [
                    (batch_row(q, b, lens[0]), qh),
                    (batch_row(k, b, lens[1]), kh),
                    (batch_row(v, b, lens[2]), vh),
                ];
                forward_row(&self.dims, (self.scale, &self.rows, b), inputs, probs, out);
            });
        *self.probs.lock().expect("attention probabilities") = Some(probs);
        Ok((CpuStorage::F32(out), Shape::from((batch, t, heads * d))))
    }

    /// The gradients of the inputs: one buffer per batch-row layout.
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
    ) -> candle_core::Result<[Vec<f32>; 3]> {
        let Dims {
            batch, heads, t, d, ..
        } = self.dims;
        let (lens, [qh, kh, vh]) = self.views();
        let s = self.dims.s;
        if q.len() != batch * lens[0]
            || k.len() != batch * lens[1]
            || v.len() != batch * lens[2]
            || dout.len() != batch * t * heads * d
        {
            candle_core::bail!(
                "attention: backward inputs of {}, {}, {}, {} elements for {:?}",
                q.len(),
                k.len(),
                v.len(),
                dout.len(),
                self.dims
            );
        }
        let kept = self.probs.lock().expect("attention probabilities");
        let Some(probs) = kept.as_deref() else {
            candle_core::bail!("attention: backward without a forward")
        };
        // SAFETY of the raw pointers below: each task touches batch row
        // `b`'s slices only, which no other task touches.
        struct Rows(*mut f32, *mut f32, *mut f32);
        unsafe impl Send for Rows {}
        unsafe impl Sync for Rows {}
        let run = |grads: Rows, packed: bool| {
            (0..batch).into_par_iter().for_each(|b| {
                let grads = &grads;
                let (dq, dk, dv) = if packed {
                    let base = unsafe { grads.0.add(b * lens[0]) };
                    (base, base, base)
                } else {
                    unsafe {
                        (
                            grads.0.add(b * lens[0]),
                            grads.1.add(b * lens[1]),
                            grads.2.add(b * lens[2]),
                        )
                    }
                };
                let input = |x: &[f32], i: usize| x[b * lens[i]..].as_ptr();
                let probs = &probs[b * heads * t * s..(b + 1) * heads * t * s];
                let dout = &dout[b * t * heads * d..(b + 1) * t * heads * d];
                backward_row(
                    &self.dims,
                    self.scale,
                    [(input(q, 0), qh), (input(k, 1), kh), (input(v, 2), vh)],
                    probs,
                    dout,
                    (dq, dk, dv),
                );
            });
        };
        match self.inputs {
            Inputs::Packed => {
                let mut dqkv = vec![0f32; batch * lens[0]];
                run(
                    Rows(
                        dqkv.as_mut_ptr(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    ),
                    true,
                );
                Ok([dqkv, Vec::new(), Vec::new()])
            }
            Inputs::Separate => {
                let (mut dq, mut dk, mut dv) = (
                    vec![0f32; batch * lens[0]],
                    vec![0f32; batch * lens[1]],
                    vec![0f32; batch * lens[2]],
                );
                run(
                    Rows(dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()),
                    false,
                );
                Ok([dq, dk, dv])
            }
        }
    }
}

/// GPT-2's (and any fused projection's) form: one input.
struct PackedOp(Attention);

impl CustomOp1 for PackedOp {
    fn name(&self) -> &'static str {
        "attention-packed"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = f32_data(storage, layout, "qkv")?;
        self.0.forward(qkv, qkv, qkv)
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (input, dout) = (qkv.storage_and_layout(), grad_res.contiguous()?);
        let dout = dout.storage_and_layout();
        let data = borrowed(&input, "qkv")?;
        let [dqkv, _, _] =
            self.0
                .backward(data, data, data, borrowed(&dout, "the output's gradient")?)?;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// Queries, keys and values apart (a KV cache, rotated heads).
struct SeparateOp(Attention);

impl CustomOp3 for SeparateOp {
    fn name(&self) -> &'static str {
        "attention"
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
        self.0.forward(
            f32_data(s1, l1, "queries")?,
            f32_data(s2, l2, "keys")?,
            f32_data(s3, l3, "values")?,
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gq, gk, gv] = [q, k, v].map(|t| t.storage_and_layout());
        let dout = grad_res.contiguous()?;
        let gd = dout.storage_and_layout();
        let [dq, dk, dv] = self.0.backward(
            borrowed(&gq, "queries")?,
            borrowed(&gk, "keys")?,
            borrowed(&gv, "values")?,
            borrowed(&gd, "the output's gradient")?,
        )?;
        let grad =
            |g: Vec<f32>, like: &Tensor| Tensor::from_vec(g, like.shape(), like.device()).map(Some);
        Ok((grad(dq, q)?, grad(dk, k)?, grad(dv, v)?))
    }
}

fn check(batch: usize, heads: usize, kv_heads: usize, s: usize, rows: &RowLayout) -> Result<()> {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(super::ModelError::Config(format!(
            "attention: {heads} query heads cannot share {kv_heads} key-value heads"
        )));
    }
    rows.check(batch, s)
}

/// Attention over queries `q` `[b, h, t, d]` and keys and values `k`, `v`
/// `[b, kv, s, d]` (`s ≥ t`; the first `s − t` keys are the cache's), each
/// batch row laid out as `rows` says. Returns `[b, t, h · d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: &RowLayout,
) -> Result<Tensor> {
    let (batch, heads, t, d) = q.dims4()?;
    let (_, kv_heads, s, _) = k.dims4()?;
    check(batch, heads, kv_heads, s, rows)?;
    if k.dims() != [batch, kv_heads, s, d] || v.dims() != k.dims() || s < t {
        return Err(super::ModelError::Config(format!(
            "attention: queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let dims = Dims {
        batch,
        heads,
        kv_heads,
        t,
        s,
        d,
    };
    let op = SeparateOp(Attention {
        dims,
        inputs: Inputs::Separate,
        scale: scale as f32,
        rows: rows.clone(),
        probs: Mutex::new(None),
    });
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Attention over a fused projection `qkv` `[b, t, (h + 2·kv) · d]`
/// (queries, then keys, then values; no cache), each batch row laid out as
/// `rows` says. Returns `[b, t, h · d]`.
pub fn attention_packed(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    rows: &RowLayout,
) -> Result<Tensor> {
    let (batch, t, width) = qkv.dims3()?;
    check(batch, heads, kv_heads, t, rows)?;
    let d = width / (heads + 2 * kv_heads);
    if d * (heads + 2 * kv_heads) != width {
        return Err(super::ModelError::Config(format!(
            "attention: a projection {width} wide for {heads} + 2 x {kv_heads} heads"
        )));
    }
    let dims = Dims {
        batch,
        heads,
        kv_heads,
        t,
        s: t,
        d,
    };
    let op = PackedOp(Attention {
        dims,
        inputs: Inputs::Packed,
        scale: scale as f32,
        rows: rows.clone(),
        probs: Mutex::new(None),
    });
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Attention from candle's primitives: the reference. The mask adds
    /// −∞ to the keys a query may not see; a query that sees none gets a
    /// zero row (its softmax is taken over a finite mask, then multiplied by 0).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: &RowLayout) -> Tensor {
        let (b, h, t, d) = q.dims4().unwrap();
        let (_, kv, s, _) = k.dims4().unwrap();
        let group = h / kv;
        let k = k
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kv, group, s, d))
            .unwrap()
            .reshape((b, h, s, d))
            .unwrap();
        let v = v
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kv, group, s, d))
            .unwrap()
            .reshape((b, h, s, d))
            .unwrap();
        let (mut mask, mut keep) = (Vec::new(), Vec::new());
        for row in 0..b {
            for i in 0..t {
                let (start, end) = (rows.start(row, s - t + i), s - t + i + 1);
                keep.push(if start < end { 1f32 } else { 0.0 });
                mask.extend((0..s).map(|j| {
                    if start >= end || (start..end).contains(&j) {
                        0f32
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).unwrap();
        let keep = Tensor::from_vec(keep, (b, 1, t, 1), &Device::Cpu).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let probs = crate::model::layers::softmax_last_dim(&scores)
            .unwrap()
            .broadcast_mul(&keep)
            .unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * d))
            .unwrap()
    }

    fn random(shape: &[usize], seed: u64) -> Var {
        let mut rng = crate::model::rng::Rng::new(seed);
        Var::from_tensor(&rng.tensor(shape, |r| r.uniform() * 2.0 - 1.0).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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

    /// Forward and all three gradients against the composed form, for a
    /// loss that weighs every output differently.
    fn agrees(b: usize, h: usize, kv: usize, t: usize, past: usize, d: usize, rows: &RowLayout) {
        let s = past + t;
        let (q, k, v) = (
            random(&[b, h, t, d], 1),
            random(&[b, kv, s, d], 2),
            random(&[b, kv, s, d], 3),
        );
        let weights = random(&[b, t, h * d], 4).as_tensor().detach();
        let scale = 1.0 / (d as f64).sqrt();
        let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, rows).unwrap();
        let theirs = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, rows);
        assert!(
            max_diff(&ours, &theirs) < 1e-5,
            "forward differs by {}",
            max_diff(&ours, &theirs)
        );
        let g1 = (&ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) < 1e-5,
                "d{name} differs by {}",
                max_diff(a, b)
            );
        }
    }

    #[test]
    fn matches_primitives_causal() {
        agrees(2, 4, 4, 7, 0, 8, &RowLayout::default());
    }

    #[test]
    fn matches_primitives_grouped_heads_with_a_cache_and_padding() {
        agrees(3, 6, 2, 5, 3, 4, &RowLayout::padded(vec![0, 2, 6]));
        agrees(2, 3, 1, 1, 9, 8, &RowLayout::padded(vec![1, 0]));
    }

    #[test]
    fn matches_primitives_packed_sequences() {
        agrees(
            2,
            4,
            2,
            9,
            0,
            8,
            &RowLayout::packed(&[vec![3, 4, 2], vec![9]]),
        );
        agrees(1, 2, 2, 6, 0, 4, &RowLayout::packed(&[vec![1, 1, 4]]));
    }

    /// Each sequence of a packed row gives what it gives alone, output and
    /// gradients: none sees another.
    #[test]
    fn a_packed_row_is_its_sequences_run_alone() {
        let (h, kv, d, lengths) = (4, 2, 8, [3usize, 5, 2]);
        let t: usize = lengths.iter().sum();
        let qkv = random(&[1, t, (h + 2 * kv) * d], 11);
        let weights = random(&[1, t, h * d], 12).as_tensor().detach();
        let rows = RowLayout::packed(&[lengths.to_vec()]);
        let packed = attention_packed(qkv.as_tensor(), h, kv, 0.3, &rows).unwrap();
        let grads = (&packed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dqkv = grads.get(qkv.as_tensor()).unwrap();
        let mut at = 0;
        for n in lengths {
            let part = qkv.as_tensor().narrow(1, at, n).unwrap().detach();
            let part = Var::from_tensor(&part).unwrap();
            let alone =
                attention_packed(part.as_tensor(), h, kv, 0.3, &RowLayout::default()).unwrap();
            assert!(max_diff(&alone, &packed.narrow(1, at, n).unwrap()) < 1e-6);
            let g = (&alone * &weights.narrow(1, at, n).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d_alone = g.get(part.as_tensor()).unwrap();
            assert!(max_diff(d_alone, &dqkv.narrow(1, at, n).unwrap()) < 1e-6);
            at += n;
        }
    }

    #[test]
    fn padding_is_never_seen_and_padding_queries_get_zeros() {
        let (h, t, d) = (2, 3, 4);
        let (q, k, v) = (
            random(&[2, h, t, d], 7),
            random(&[2, h, t, d], 8),
            random(&[2, h, t, d], 9),
        );
        let out = attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            0.5,
            &RowLayout::padded(vec![2, 0]),
        )
        .unwrap();
        // Row 0: queries 0 and 1 are padding; query 2 sees key 2 only, so
        // its output is value 2 of each head.
        let row0 = out.get(0).unwrap();
        assert_eq!(
            row0.narrow(0, 0, 2)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let value2 = v
            .as_tensor()
            .get(0)
            .unwrap()
            .narrow(1, 2, 1)
            .unwrap()
            .reshape(h * d)
            .unwrap();
        assert!(max_diff(&row0.get(2).unwrap(), &value2) < 1e-6);
        // Row 1: unpadded, as alone.
        let alone = attention(
            &q.as_tensor().narrow(0, 1, 1).unwrap(),
            &k.as_tensor().narrow(0, 1, 1).unwrap(),
            &v.as_tensor().narrow(0, 1, 1).unwrap(),
            0.5,
            &RowLayout::default(),
        )
        .unwrap();
        assert_eq!(
            out.get(1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn packed_matches_separate() {
        let (b, h, kv, t, d) = (2, 6, 3, 5, 4);
        let qkv = random(&[b, t, (h + 2 * kv) * d], 5);
        let weights = random(&[b, t, h * d], 6).as_tensor().detach();
        let heads = |from: usize, n: usize| {
            qkv.as_tensor()
                .narrow(2, from * d, n * d)
                .unwrap()
                .reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let pads = RowLayout::padded(vec![1, 0]);
        let packed = attention_packed(qkv.as_tensor(), h, kv, 0.5, &pads).unwrap();
        let separate =
            attention(&heads(0, h), &heads(h, kv), &heads(h + kv, kv), 0.5, &pads).unwrap();
        assert!(max_diff(&packed, &separate) < 1e-6);
        let g1 = (&packed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&separate * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g1.get(qkv.as_tensor()).unwrap(),
            g2.get(qkv.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-6, "dqkv differs by {}", max_diff(a, b));
    }

    #[test]
    fn backward_runs_again_on_the_same_graph() {
        let qkv = random(&[2, 3, 3 * 8], 10);
        let loss = attention_packed(qkv.as_tensor(), 2, 2, 0.5, &RowLayout::default())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let (first, second) = (loss.backward().unwrap(), loss.backward().unwrap());
        assert_eq!(
            max_diff(
                first.get(qkv.as_tensor()).unwrap(),
                second.get(qkv.as_tensor()).unwrap()
            ),
            0.0
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let q = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 3, 2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&q, &k, &k, 1.0, &RowLayout::default()).is_err());
        let k = Tensor::zeros((1, 2, 1, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention(&q, &k, &k, 1.0, &RowLayout::default()).is_err(),
            "fewer keys than queries"
        );
        let qkv = Tensor::zeros((1, 2, 30), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(attention_packed(&qkv, 4, 4, 1.0, &RowLayout::default()).is_err());
        assert!(
            attention_packed(
                &Tensor::zeros((2, 2, 24), candle_core::DType::F32, &Device::Cpu).unwrap(),
                4,
                4,
                1.0,
                &RowLayout::padded(vec![0])
            )
            .is_err()
        );
    }
}
