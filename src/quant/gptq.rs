//! Blocks chosen with the activations a weight meets (GPTQ, Frantar et al.
//! 2022): the weight's values are rounded one input dimension after
//! another, and each rounding error is spread over the dimensions not yet
//! rounded, weighted by the inverse of the input's Hessian `H = Σ xᵀx` over
//! calibration tokens, so that the layer's output on those tokens moves as
//! little as it can. Each block of 32 gets its scale when its first value is
//! reached (from the values as the earlier errors left them), searched for
//! the least `H`-diagonal-weighted error; the blocks' layout is RTN's
//! (symmetric or affine), so the file's size is the same.

use rayon::prelude::*;

use super::{BLOCK, Bits, Packed};

/// The input's Hessian `Σ xᵀx` over calibration tokens, `[k, k]` row-major.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub k: usize,
    pub values: Vec<f64>,
}

/// Scales tried per block: the RTN scale times each of these (1 first).
const SHRINK: [f32; 8] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65];

/// Rows done together: each row of the inverse's factor is read once for
/// all of them.
const TILE: usize = 32;

/// GPTQ's damping: this share of the mean diagonal is added to it.
const DAMP: f64 = 0.01;

/// The upper-triangular `U` with `H⁻¹ = UᵀU` (GPTQ's `Hinv`), `H` damped;
/// `None` when `H` stays singular after ever more damping.
fn inverse_factor(h: &Hessian) -> Option<Vec<f32>> {
    let k = h.k;
    let mut diag_mean = (0..k).map(|i| h.values[i * k + i]).sum::<f64>() / k as f64;
    if diag_mean.is_nan() || diag_mean <= 0.0 {
        diag_mean = 1.0;
    }
    let mut damp = DAMP;
    for _ in 0..6 {
        // H' = P H P (P reverses the order): its Cholesky factor L' gives
        // H = R Rᵀ with R = P L' P upper, so U = R⁻¹ = P L'⁻¹ P.
        let mut a = vec![0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                a[(k - 1 - i) * k + (k - 1 - j)] = h.values[i * k + j];
            }
            let d = &mut a[(k - 1 - i) * k + (k - 1 - i)];
            // A dimension no calibration token uses: rounded alone.
            if *d == 0.0 {
                *d = diag_mean;
            }
            *d += damp * diag_mean;
        }
        if let Some(l) = symb_kernels::cholesky(a, k) {
            let m = symb_kernels::lower_inverse(&l, k);
            let mut u = vec![0f32; k * k];
            for i in 0..k {
                for j in i..k {
                    u[i * k + j] = m[(k - 1 - i) * k + (k - 1 - j)] as f32;
                }
            }
            return Some(u);
        }
        damp *= 10.0;
    }
    None
}

/// The blocks of a weight given column by column (`columns`: `n` columns
/// of `k`, as [`super::pack_columns`] takes them) on `grid`, chosen with
/// `h`, the Hessian of the weight's input (`[k, k]`); with `h` the
/// identity and no scale search, they are RTN's.
pub fn pack_columns(
    columns: &[f32],
    k: usize,
    n: usize,
    bits: Bits,
    grid: symb_kernels::Grid,
    h: &Hessian,
    search: bool,
) -> Packed {
    assert_eq!(h.k, k, "the Hessian's size is the weight's input width");
    let Some(u) = inverse_factor(h) else {
        return super::pack_columns(columns, k, n, bits, grid);
    };
    let diag: Vec<f32> = (0..k).map(|i| h.values[i * k + i] as f32).collect();
    let blocks = k.div_ceil(BLOCK);
    let mut codes = vec![bits.zero(); n * blocks * BLOCK];
    let mut steps = vec![symb_kernels::Step::default(); n * blocks];
    let shrink: &[f32] = if search { &SHRINK } else { &SHRINK[..1] };
    columns
        .par_chunks(TILE * k)
        .zip(codes.par_chunks_mut(TILE * blocks * BLOCK))
        .zip(steps.par_chunks_mut(TILE * blocks))
        .for_each(|((tile, codes), steps)| {
            let mut w = tile.to_vec();
            symb_kernels::gptq_rows(&mut w, k, &u, &diag, grid, shrink, BLOCK, codes, steps);
        });
    Packed {
        calibrated: true,
        ..Packed::new(&codes, &steps, bits, grid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of values in [-1, 1).
    fn noise(seed: u64, count: usize) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x` `[t, k]`: correlated inputs (each a mix of a few shared factors
    /// plus noise), as a layer's activations are.
    fn activations(t: usize, k: usize) -> Vec<f32> {
        let factors = 4;
        let mix = noise(7, factors * k);
        let f = noise(8, t * factors);
        let e = noise(9, t * k);
        (0..t)
            .flat_map(|r| {
                let (mix, f, e) = (&mix, &f, &e);
                (0..k).map(move |c| {
                    (0..factors)
                        .map(|j| f[r * factors + j] * mix[j * k + c] * 3.0)
                        .sum::<f32>()
                        + 0.1 * e[r * k + c]
                })
            })
            .collect()
    }

    fn hessian(x: &[f32], t: usize, k: usize) -> Hessian {
        let mut values = vec![0f64; k * k];
        for r in 0..t {
            let row = &x[r * k..(r + 1) * k];
            for i in 0..k {
                for j in 0..k {
                    values[i * k + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        Hessian { k, values }
    }

    /// Σ over tokens and outputs of (x · (w - q))².
    fn output_error(x: &[f32], t: usize, w: &[f32], q: &[f32], k: usize, n: usize) -> f64 {
        let mut total = 0f64;
        for r in 0..t {
            for c in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * (w[c * k + i] - q[c * k + i]) as f64;
                }
                total += s * s;
            }
        }
        total
    }

    fn grid(bits: Bits, affine: bool) -> symb_kernels::Grid {
        symb_kernels::Grid {
            zero: bits.zero() as f32,
            top: bits.top(),
            affine,
        }
    }

    #[test]
    fn with_uncorrelated_inputs_and_no_search_it_is_rtn() {
        let (k, n) = (96, 5);
        let w = noise(1, k * n);
        let mut values = vec![0f64; k * k];
        for i in 0..k {
            values[i * k + i] = 2.0;
        }
        let h = Hessian { k, values };
        for (bits, affine) in [
            (Bits::Four, false),
            (Bits::Eight, false),
            (Bits::Four, true),
        ] {
            let g = grid(bits, affine);
            let gptq = pack_columns(&w, k, n, bits, g, &h, false);
            assert!(gptq.calibrated);
            assert_eq!(
                Packed {
                    calibrated: false,
                    ..gptq
                },
                super::super::pack_columns(&w, k, n, bits, g)
            );
        }
    }

    #[test]
    fn the_layers_output_moves_less_than_with_rtn() {
        let (t, k, n) = (512, 128, 24);
        let x = activations(t, k);
        let h = hessian(&x, t, k);
        let w = noise(2, k * n);
        for affine in [false, true] {
            let g = grid(Bits::Four, affine);
            let rtn = super::super::pack_columns(&w, k, n, Bits::Four, g);
            let rtn = output_error(&x, t, &w, &rtn.dequantize(k, n, Bits::Four), k, n);
            for search in [false, true] {
                let p = pack_columns(&w, k, n, Bits::Four, g, &h, search);
                let gptq = output_error(&x, t, &w, &p.dequantize(k, n, Bits::Four), k, n);
                assert!(
                    gptq < 0.5 * rtn,
                    "affine {affine}, search {search}: GPTQ's output error {gptq} against RTN's {rtn}"
                );
            }
        }
    }

    /// At a width of several of the factorisations' panels (and not a
    /// multiple of one): `(UᵀU) · H_damped = I` by two matrix products.
    #[test]
    fn the_inverse_factor_holds_across_panels() {
        let (t, k) = (400, 150);
        let x = activations(t, k);
        let h = hessian(&x, t, k);
        let u = inverse_factor(&h).unwrap();
        let mean = (0..k).map(|i| h.values[i * k + i]).sum::<f64>() / k as f64;
        let mut uu = vec![0f64; k * k];
        for a in 0..k {
            for i in 0..k {
                let ui = u[a * k + i] as f64;
                if ui != 0.0 {
                    for m in 0..k {
                        uu[i * k + m] += ui * u[a * k + m] as f64;
                    }
                }
            }
        }
        let mut worst = 0f64;
        for i in 0..k {
            for j in 0..k {
                let s: f64 = (0..k)
                    .map(|m| {
                        let hd = h.values[m * k + j] + if m == j { DAMP * mean } else { 0.0 };
                        uu[i * k + m] * hd
                    })
                    .sum();
                worst = worst.max((s - if i == j { 1.0 } else { 0.0 }).abs());
            }
        }
        assert!(worst < 1e-3, "{worst}");
    }

    #[test]
    fn the_inverse_factor_is_the_cholesky_factor_of_the_inverse() {
        let (t, k) = (64, 40);
        let x = activations(t, k);
        let h = hessian(&x, t, k);
        let u = inverse_factor(&h).unwrap();
        // (UᵀU) · H_damped = I.
        let mean = (0..k).map(|i| h.values[i * k + i]).sum::<f64>() / k as f64;
        for i in 0..k {
            for j in 0..k {
                let mut s = 0f64;
                for m in 0..k {
                    let uu: f64 = (0..k)
                        .map(|a| u[a * k + i] as f64 * u[a * k + m] as f64)
                        .sum();
                    let hd = h.values[m * k + j] + if m == j { DAMP * mean } else { 0.0 };
                    s += uu * hd;
                }
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((s - expected).abs() < 1e-3, "({i}, {j}): {s}");
            }
        }
        for i in 0..k {
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0);
            }
        }
    }
}
