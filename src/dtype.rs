//! The dtypes an export is written in, and everything that follows from one:
//! its name in the manifest and on the command line, the file transformers.js
//! loads for it, and the names of its stages. Decided here once, so that the
//! manifest, the quantizers, verification, the bundle and the lint agree.

use std::fmt;
use std::str::FromStr;

/// One ONNX file of the output: its weights' (and compute's) precision.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// The export itself.
    Fp32,
    /// Weights and compute in half precision; inputs and outputs stay fp32.
    Fp16,
    /// Weight-only 8 bits: every weight, the head and the embedding held as
    /// int8 in blocks of 32 (symmetric) and turned back into floats by
    /// constant Cast and Mul; activations stay float.
    Q8,
    /// Dynamic int8 of the MatMul weights (`quantize_dynamic`, QInt8).
    Int8,
    /// Dynamic uint8 (QUInt8).
    Uint8,
    /// 4-bit blocks (`MatMulNBits`, block 32, symmetric).
    Q4,
    /// q4, then fp16 for the rest.
    Q4f16,
}

impl Dtype {
    /// Every dtype, in the order stages are planned.
    pub const ALL: [Dtype; 7] = [
        Dtype::Fp32,
        Dtype::Fp16,
        Dtype::Q8,
        Dtype::Int8,
        Dtype::Uint8,
        Dtype::Q4,
        Dtype::Q4f16,
    ];

    /// The targets a manifest's `[export]` builds when it names none.
    pub const DEFAULT_TARGETS: [Dtype; 5] =
        [Dtype::Fp32, Dtype::Fp16, Dtype::Q8, Dtype::Q4, Dtype::Q4f16];

    /// The name in the manifest, on the command line and in transformers.js.
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Q8 => "q8",
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
            Dtype::Q4 => "q4",
            Dtype::Q4f16 => "q4f16",
        }
    }

    /// The file transformers.js loads for this dtype, under `onnx/`
    /// (`model{suffix}.onnx`; q8 is `_quantized`).
    pub const fn file_name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "model.onnx",
            Dtype::Fp16 => "model_fp16.onnx",
            Dtype::Q8 => "model_quantized.onnx",
            Dtype::Int8 => "model_int8.onnx",
            Dtype::Uint8 => "model_uint8.onnx",
            Dtype::Q4 => "model_q4.onnx",
            Dtype::Q4f16 => "model_q4f16.onnx",
        }
    }

    /// The dtype whose file is `name`.
    pub fn from_file_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.file_name() == name)
    }

    /// The stage that writes this dtype's file: `export` for fp32,
    /// `quantize.<dtype>` for the others.
    pub const fn producer_stage(self) -> &'static str {
        match self {
            Dtype::Fp32 => "export",
            Dtype::Fp16 => "quantize.fp16",
            Dtype::Q8 => "quantize.q8",
            Dtype::Int8 => "quantize.int8",
            Dtype::Uint8 => "quantize.uint8",
            Dtype::Q4 => "quantize.q4",
            Dtype::Q4f16 => "quantize.q4f16",
        }
    }

    /// The stage that checks this dtype's file: `verify.<dtype>`.
    pub const fn verify_stage(self) -> &'static str {
        match self {
            Dtype::Fp32 => "verify.fp32",
            Dtype::Fp16 => "verify.fp16",
            Dtype::Q8 => "verify.q8",
            Dtype::Int8 => "verify.int8",
            Dtype::Uint8 => "verify.uint8",
            Dtype::Q4 => "verify.q4",
            Dtype::Q4f16 => "verify.q4f16",
        }
    }

    /// 4-bit blocks (q4, q4f16): where `quantize_embedding` and
    /// `accuracy_level` apply.
    pub const fn is_4bit(self) -> bool {
        matches!(self, Dtype::Q4 | Dtype::Q4f16)
    }

    /// Blocks of MatMulNBits (q8, q4, q4f16): where `accuracy_level` applies.
    pub const fn uses_blocks(self) -> bool {
        matches!(self, Dtype::Q8 | Dtype::Q4 | Dtype::Q4f16)
    }

    /// Whether the file quantizes its activations with one scale over each
    /// call's whole tensor (int8, uint8: `DynamicQuantizeLinear`): a
    /// position's logits then depend on the positions run beside it in the
    /// same call. In every other dtype a position's logits are its own.
    pub const fn scales_activations_per_call(self) -> bool {
        matches!(self, Dtype::Int8 | Dtype::Uint8)
    }

    /// The names, for messages: `fp32, fp16, q8, ...`.
    pub fn list() -> String {
        Dtype::ALL.map(Dtype::name).join(", ")
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no dtype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a dtype (known: {list})", list = Dtype::list())]
pub struct UnknownDtype(pub String);

impl FromStr for Dtype {
    type Err = UnknownDtype;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| UnknownDtype(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_and_stages_follow_transformers_js() {
        for dtype in Dtype::ALL {
            assert_eq!(dtype.name().parse::<Dtype>(), Ok(dtype));
            assert_eq!(Dtype::from_file_name(dtype.file_name()), Some(dtype));
            assert_eq!(serde_json::to_value(dtype).unwrap(), dtype.name());
        }
        assert_eq!(Dtype::Q8.file_name(), "model_quantized.onnx");
        assert_eq!(Dtype::Fp32.producer_stage(), "export");
        assert_eq!(Dtype::Q4f16.producer_stage(), "quantize.q4f16");
        assert_eq!(Dtype::Uint8.verify_stage(), "verify.uint8");
        for dtype in Dtype::ALL {
            let producer = match dtype {
                Dtype::Fp32 => "export".to_string(),
                other => format!("quantize.{other}"),
            };
            assert_eq!(dtype.producer_stage(), producer);
            assert_eq!(dtype.verify_stage(), format!("verify.{dtype}"));
        }
        assert_eq!(
            "q3".parse::<Dtype>().unwrap_err().to_string(),
            "`q3` is not a dtype (known: fp32, fp16, q8, int8, uint8, q4, q4f16)"
        );
    }
}
