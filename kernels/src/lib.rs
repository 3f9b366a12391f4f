//! symb's numeric inner loops: the ones that run over every weight of a
//! real model (GPTQ's factorisations and column sweep, a distribution's
//! divergence over a vocabulary). They live in their own crate so that
//! the root `Cargo.toml` can build them optimised in the dev profile too:
//! unoptimised, GPTQ on a 135M-parameter model takes half an hour, and the
//! test suite runs it. No dependencies; what they compute is tested where
//! symb uses them (`symb::quant::gptq`, `symb::quant::mixed`).

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

/// The lower Cholesky factor of the symmetric `a` `[k, k]` (row-major, in
/// place), or `None` when it is not positive definite.
pub fn cholesky(mut a: Vec<f64>, k: usize) -> Option<Vec<f64>> {
    for j in 0..k {
        let (upto, below) = a.split_at_mut((j + 1) * k);
        let row_j = &mut upto[j * k..];
        let d = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        if !(d > 0.0 && d.is_finite()) {
            return None;
        }
        row_j[j] = d.sqrt();
        let pivot = row_j[j];
        let row_j = &row_j[..j];
        for row_i in below.chunks_exact_mut(k) {
            row_i[j] = (row_i[j] - dot(&row_i[..j], row_j)) / pivot;
        }
    }
    for i in 0..k {
        a[i * k + i + 1..(i + 1) * k].fill(0.0);
    }
    Some(a)
}

/// `l⁻¹` of a lower-triangular `l` `[k, k]`, row by row.
pub fn lower_inverse(l: &[f64], k: usize) -> Vec<f64> {
    let mut m = vec![0f64; k * k];
    let mut row = vec![0f64; k];
    for i in 0..k {
        row.fill(0.0);
        row[i] = 1.0;
        for j in 0..i {
            let c = l[i * k + j];
            if c != 0.0 {
                let mj = &m[j * k..j * k + j + 1];
                for (r, v) in row[..=j].iter_mut().zip(mj) {
                    *r -= c * v;
                }
            }
        }
        let d = l[i * k + i];
        for (out, r) in m[i * k..i * k + i + 1].iter_mut().zip(&row[..=i]) {
            *out = r / d;
        }
    }
    m
}

/// A symmetric integer grid: stored values 0..=`top`, `zero` meaning 0.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub zero: f32,
    pub top: f32,
}

impl Grid {
    /// The stored value of `x` at `scale` (`inverse` = 1 / scale, or 0).
    #[inline]
    pub fn code(self, x: f32, inverse: f32) -> f32 {
        (round(x * inverse) + self.zero).clamp(0.0, self.top)
    }
}

/// The scale of one block `v` on `grid`: its value of largest magnitude
/// over -zero (round to nearest's), times the factor of `shrink` (1 first)
/// whose rounding has the least squared error weighted by `weights`.
pub fn block_scale(v: &[f32], weights: &[f32], grid: Grid, shrink: &[f32]) -> f32 {
    let largest = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let extreme = v
        .iter()
        .copied()
        .find(|x| x.abs() == largest)
        .unwrap_or(0.0);
    let rtn = extreme / -grid.zero;
    if shrink.len() < 2 || rtn == 0.0 {
        return rtn;
    }
    let error = |scale: f32| -> f32 {
        let inverse = 1.0 / scale;
        v.iter()
            .zip(weights)
            .map(|(&x, &w)| {
                let e = x - (grid.code(x, inverse) - grid.zero) * scale;
                w * e * e
            })
            .sum()
    };
    let mut best = (error(rtn), rtn);
    for factor in &shrink[1..] {
        let scale = rtn * factor;
        let e = error(scale);
        if e < best.0 {
            best = (e, scale);
        }
    }
    best.1
}

/// GPTQ's sweep over `rows` of a weight, each `k` values (`w`, changed in
/// place): value `i` of a row is stored as `codes[row][i]` on `grid` at its
/// block's scale (chosen by [`block_scale`] when the block's first value is
/// reached, written to `scales[row][block]`), and its error, over `u[i][i]`,
/// is taken from the row's later values along row `i` of `u` (`[k, k]`,
/// upper-triangular, `H⁻¹ = uᵀu`). `diag` is `H`'s diagonal.
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
    scales: &mut [f32],
) {
    let rows = w.len() / k;
    let blocks = k.div_ceil(block);
    let mut scale = vec![0f32; rows];
    let mut err = vec![0f32; rows];
    for i in 0..k {
        if i % block == 0 {
            let end = (i + block).min(k);
            for r in 0..rows {
                let s = block_scale(&w[r * k + i..r * k + end], &diag[i..end], grid, shrink);
                scale[r] = s;
                scales[r * blocks + i / block] = s;
            }
        }
        let d = u[i * k + i];
        for r in 0..rows {
            let x = w[r * k + i];
            let s = scale[r];
            let inverse = if s != 0.0 { 1.0 / s } else { 0.0 };
            let q = grid.code(x, inverse);
            codes[r * blocks * block + i] = q as u8;
            err[r] = (x - (q - grid.zero) * s) / d;
        }
        let factor = &u[i * k + i + 1..(i + 1) * k];
        for r in 0..rows {
            let e = err[r];
            if e != 0.0 {
                for (x, f) in w[r * k + i + 1..(r + 1) * k].iter_mut().zip(factor) {
                    *x -= e * f;
                }
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
