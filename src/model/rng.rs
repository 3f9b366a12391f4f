//! A seeded random source: SplitMix64, written out so that a seed gives the
//! same numbers whatever the versions of the `rand` crates (seeded runs must
//! give byte-identical weights and adapters).

use candle_core::{Device, Tensor};

use super::Result;

/// A deterministic random source (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The generator's state, to checkpoint it (`Rng::new(state)` resumes).
    pub fn state(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A tensor of `len` values drawn by `draw`, shaped `shape`.
    pub fn tensor(
        &mut self,
        shape: &[usize],
        mut draw: impl FnMut(&mut Self) -> f64,
    ) -> Result<Tensor> {
        let len = shape.iter().product();
        let values: Vec<f32> = (0..len).map(|_| draw(self) as f32).collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }
}
