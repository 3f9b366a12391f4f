//! symb's numeric inner loops: the ones that run over every weight of a
//! real model (GPTQ's factorisations and column sweep, a distribution's
//! divergence over a vocabulary). They live in their own crate so that
//! the root `Cargo.toml` can build them optimised in the dev profile too:
//! unoptimised, GPTQ on a 135M-parameter model takes half an hour, and the
//! test suite runs it. One dependency, `gemm` (candle's matrix product);
//! what they compute is tested where symb uses them (`symb::quant::gptq`,
//! `symb::quant::mixed`).

/// `v.round()` (half away from zero) for |v| < 2³¹, without a libm call.
#[inline]
pub fn round(v: f32) -> f32 {
    let t = v as i32 as f32;
    let f = v - t;
    if f >= 0.5 {
        t + 1.0
    } else if f <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// `a · b`, four lanes at a time.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for t in 0..4 {
            s[t] += x[t] * y[t];
        }
    }
    s.iter().sum::<f64>() + tail
}

/// Rows and columns per panel of the blocked factorisations.
const PANEL: usize = 64;

/// `dst[m, n] = alpha * dst + beta * lhs[m, kk] · rhs[kk, n]` over row-major
/// views (`*_rs`: each one's row stride), in f64.
///
/// # Safety
/// Each view's rows and columns lie inside its allocation; `dst` overlaps
/// neither input.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, kk): (usize, usize, usize),
    dst: *mut f64,
    dst_rs: usize,
    lhs: *const f64,
    lhs_rs: usize,
    rhs: *const f64,
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f64,
    beta: f64,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            dst,
            1,
            dst_rs as isize,
            alpha != 0.0,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            alpha,
            beta,
            false,
            false,
            false,
            // Each weight's factorisations run one after another: on all cores.
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// The lower Cholesky factor of the symmetric `a` `[k, k]` (row-major, in
/// place), or `None` when it is not positive definite. Blocked: each panel
/// of columns is factored, then the rest of the matrix is updated by one
/// matrix product.
pub fn cholesky(mut a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    for j0 in (0..k).step_by(PANEL) {
        let j1 = (j0 + PANEL).min(k);
        // The panel's columns, for every row from j0 down.
        for j in j0..j1 {
            let (upto, below) = a.split_at_mut((j + 1) * k);
            let row_j = &mut upto[j * k..];
            let d = row_j[j] - dot(&row_j[j0..j], &row_j[j0..j]);
            if !(d > 0.0 && d.is_finite()) {
                return None;
            }
            row_j[j] = d.sqrt();
            let pivot = row_j[j];
            let row_j = &row_j[j0..j];
            for row_i in below.chunks_exact_mut(k) {
                row_i[j] = (row_i[j] - dot(&row_i[j0..j], row_j)) / pivot;
            }
        }
        if j1 < k {
            // a[j1.., j1..] -= L[j1.., j0..j1] · L[j1.., j0..j1]ᵀ
            let p = a.as_mut_ptr();
            // SAFETY: rows j1..k, columns j1..k of `a` are written; columns
            // j0..j1 of the same rows are read: disjoint, all inside `a`.
            unsafe {
                product(
                    (k - j1, k - j1, j1 - j0),
                    p.add(j1 * k + j1),
                    k,
                    p.add(j1 * k + j0),
                    k,
                    p.add(j1 * k + j0),
                    (1, k),
                    1.0,
                    -1.0,
                );
            }
        }
    }
    for i in 0..k {
        a[i * k + i + 1..(i + 1) * k].fill(0.0);
    }
    Some(a)
}

/// `l⁻¹` of a lower-triangular `l` `[k, k]`, by panels of rows: each
/// panel's diagonal block inverted row by row, the block left of it as
/// `-X[I, I] · (L[I, ..I] · X[..I, ..I])`.
pub fn lower_inverse(l: &[f64], k: usize) -> Vec<f64> {
    let mut m = vec![0f64; k * k];
    let mut row = vec![0f64; k];
    let mut t = vec![0f64; PANEL * k];
    for i0 in (0..k).step_by(PANEL) {
        let i1 = (i0 + PANEL).min(k);
        for i in i0..i1 {
            row[i0..=i].fill(0.0);
            row[i] = 1.0;
            for j in i0..i {
                let c = l[i * k + j];
                if c != 0.0 {
                    let mj = &m[j * k + i0..j * k + j + 1];
                    for (r, v) in row[i0..=j].iter_mut().zip(mj) {
                        *r -= c * v;
                    }
                }
            }
            let d = l[i * k + i];
            for (out, r) in m[i * k + i0..i * k + i + 1].iter_mut().zip(&row[i0..=i]) {
                *out = r / d;
            }
        }
        if i0 > 0 {
            let rows = i1 - i0;
            let (done, rest) = m.split_at_mut(i0 * k);
            // SAFETY: `t` holds rows x i0; L's rows i0..i1 and X's rows
            // ..i0 (`done`) are read; X's rows i0..i1, columns ..i0, are
            // written from `t` and X's diagonal block (columns i0..i1 of
            // the same rows): disjoint columns.
            unsafe {
                product(
                    (rows, i0, i0),
                    t.as_mut_ptr(),
                    i0,
                    l.as_ptr().add(i0 * k),
                    k,
                    done.as_ptr(),
                    (k, 1),
                    0.0,
                    1.0,
                );
                let p = rest.as_mut_ptr();
                product(
                    (rows, i0, rows),
                    p,
                    k,
                    p.add(i0),
                    k,
                    t.as_ptr(),
                    (i0, 1),
                    0.0,
                    -1.0,
                );
            }
        }
    }
    m
}

/// An integer grid: stored values 0..=`top`, a value `q` meaning
/// `(q - zero) * scale + offset` with its block's scale and offset.
/// Symmetric grids have no offset (0 at `zero`); affine ones fit each
/// block's range from its least value to its largest.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub zero: f32,
    pub top: f32,
    pub affine: bool,
}

/// One block's step on a grid: its scale and offset (0 when symmetric).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Step {
    pub scale: f32,
    pub offset: f32,
}

impl Grid {
    /// The stored value of `x` at `step` (`inverse` = 1 / its scale, or 0).
    #[inline]
    pub fn code(self, x: f32, step: Step, inverse: f32) -> f32 {
        (round((x - step.offset) * inverse) + self.zero).clamp(0.0, self.top)
    }

    /// The value a stored `q` stands for.
    #[inline]
    pub fn value(self, q: f32, step: Step) -> f32 {
        (q - self.zero) * step.scale + step.offset
    }

    /// Round to nearest's step for the block `v`. Symmetric: its value of
    /// largest magnitude over -zero (onnxruntime's symmetric blockwise
    /// quantizer). Affine: the least value at 0 and the largest at `top`.
    fn nearest(self, v: &[f32]) -> Step {
        if self.affine {
            let (lo, hi) = v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
            if !(lo <= hi) {
                return Step::default();
            }
            let scale = (hi - lo) / self.top;
            return Step {
                scale,
                offset: lo + self.zero * scale,
            };
        }
        let largest = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        let extreme = v
            .iter()
            .copied()
            .find(|x| x.abs() == largest)
            .unwrap_or(0.0);
        Step {
            scale: extreme / -self.zero,
            offset: 0.0,
        }
    }

    /// `step` with its range narrowed by `factor` about the range's middle.
    fn shrunk(self, step: Step, factor: f32) -> Step {
        if !self.affine {
            return Step {
                scale: step.scale * factor,
                offset: 0.0,
            };
        }
        let middle = self.value(self.top / 2.0, step);
        let scale = step.scale * factor;
        Step {
            scale,
            offset: middle - (self.top / 2.0 - self.zero) * scale,
        }
    }
}

/// The step of one block `v` on `grid`: round to nearest's
/// ([`Grid::nearest`]), its range narrowed by the factor of `shrink` (1
/// first) whose rounding has the least squared error weighted by
/// `weights`.
pub fn block_step(v: &[f32], weights: &[f32], grid: Grid, shrink: &[f32]) -> Step {
    let rtn = grid.nearest(v);
    if shrink.len() < 2 || rtn.scale == 0.0 {
        return rtn;
    }
    // Rounded half to even by adding and taking away 1.5 * 2^23 (|x| <
    // 2^22): without branches, so the loop runs in vector lanes; it differs
    // from the stored values' rounding only on exact halves.
    const MAGIC: f32 = 12_582_912.0;
    let error = |step: Step| -> f32 {
        let inverse = 1.0 / step.scale;
        v.iter()
            .zip(weights)
            .map(|(&x, &w)| {
                let t = (x - step.offset) * inverse;
                let q = ((t + MAGIC) - MAGIC + grid.zero).clamp(0.0, grid.top);
                let e = x - grid.value(q, step);
                w * e * e
            })
            .sum()
    };
    let mut best = (error(rtn), rtn);
    for &factor in &shrink[1..] {
        let step = grid.shrunk(rtn, factor);
        let e = error(step);
        if e < best.0 {
            best = (e, step);
        }
    }
    best.1
}

/// Each block's stored values `codes` (`block` per block) and `steps` of
/// `values` (rows of `k`, blocks along each row) on `grid` by round to
/// nearest.
pub fn round_rows(
    values: &[f32],
    k: usize,
    grid: Grid,
    block: usize,
    codes: &mut [u8],
    steps: &mut [Step],
) {
    let blocks = k.div_ceil(block);
    for (r, row) in values.chunks_exact(k).enumerate() {
        for (b, v) in row.chunks(block).enumerate() {
            let step = grid.nearest(v);
            steps[r * blocks + b] = step;
            let inverse = if step.scale != 0.0 { 1.0 / step.scale } else { 0.0 };
            let out = &mut codes[(r * blocks + b) * block..];
            for (q, &x) in out.iter_mut().zip(v) {
                *q = grid.code(x, step, inverse) as u8;
            }
        }
    }
}

/// GPTQ's sweep over `rows` of a weight, each `k` values (`w`, changed in
/// place): value `i` of a row is stored as `codes[row][i]` on `grid` at its
/// block's step (chosen by [`block_step`] when the block's first value is
/// reached, written to `steps[row][block]`), and its error, over `u[i][i]`,
/// is taken from the row's later values along row `i` of `u` (`[k, k]`,
/// upper-triangular, `H⁻¹ = uᵀu`). `diag` is `H`'s diagonal. The errors
/// reach the values past a batch of four blocks in one matrix product per
/// batch (GPTQ's lazy batch updates), the same sums in another order.
#[allow(clippy::too_many_arguments)]
pub fn gptq_rows(
    w: &mut [f32],
    k: usize,
    u: &[f32],
    diag: &[f32],
    grid: Grid,
    shrink: &[f32],
    block: usize,
    codes: &mut [u8],
    steps: &mut [Step],
) {
    let rows = w.len() / k;
    let blocks = k.div_ceil(block);
    let batch = 4 * block;
    let mut step = vec![Step::default(); rows];
    // The batch's errors, `[rows, batch]`.
    let mut err = vec![0f32; rows * batch];
    for b0 in (0..k).step_by(batch) {
        let b1 = (b0 + batch).min(k);
        for i in b0..b1 {
            if i % block == 0 {
                let end = (i + block).min(k);
                for r in 0..rows {
                    let s = block_step(&w[r * k + i..r * k + end], &diag[i..end], grid, shrink);
                    step[r] = s;
                    steps[r * blocks + i / block] = s;
                }
            }
            let d = u[i * k + i];
            let factor = &u[i * k + i + 1..i * k + b1];
            for r in 0..rows {
                let x = w[r * k + i];
                let s = step[r];
                let inverse = if s.scale != 0.0 { 1.0 / s.scale } else { 0.0 };
                let q = grid.code(x, s, inverse);
                codes[r * blocks * block + i] = q as u8;
                let e = (x - grid.value(q, s)) / d;
                err[r * batch + i - b0] = e;
                if e != 0.0 {
                    for (x, f) in w[r * k + i + 1..r * k + b1].iter_mut().zip(factor) {
                        *x -= e * f;
                    }
                }
            }
        }
        if b1 < k {
            // w[:, b1..] -= err[:, ..b1 - b0] · u[b0..b1, b1..]
            // SAFETY: every pointer and stride stays inside its slice: `w`
            // holds `rows` rows of `k`, `err` `rows` rows of `batch`, `u`
            // `k` rows of `k`; `dst` does not alias the inputs.
            unsafe {
                gemm::gemm(
                    rows,
                    k - b1,
                    b1 - b0,
                    w.as_mut_ptr().add(b1),
                    1,
                    k as isize,
                    true,
                    err.as_ptr(),
                    1,
                    batch as isize,
                    u.as_ptr().add(b0 * k + b1),
                    1,
                    k as isize,
                    1.0f32,
                    -1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }
}

/// Per position of `p` and `q` (log-probabilities, rows of `vocab`): the
/// summed KL(p ‖ q) and how many rows have the same argmax (the first).
pub fn kl_and_agreement(p: &[f32], q: &[f32], vocab: usize) -> (f64, usize) {
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0
    };
    let (mut kl, mut agree) = (0f64, 0);
    for (p, q) in p.chunks(vocab).zip(q.chunks(vocab)) {
        kl += p
            .iter()
            .zip(q)
            .map(|(&lp, &lq)| (lp as f64).exp() * (lp - lq) as f64)
            .sum::<f64>();
        agree += usize::from(argmax(p) == argmax(q));
    }
    (kl, agree)
}

/// `row` as log-probabilities, in place.
pub fn log_softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let log = sum.ln() as f32 + max;
    for v in row {
        *v -= log;
    }
}
