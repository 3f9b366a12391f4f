//! GPT-2 lowered to ONNX with a KV cache, named as transformers.js reads it.
//!
//! Inputs and outputs are the decoder contract ([`Decoder`](crate::onnx::Decoder)), the
//! cache `n_head` heads wide.
//!
//! The attention bias combines the causal mask (query `s` sees keys up to
//! `past + s`) with the padding mask, so left-padded batches work; masked
//! positions get the lowest float rather than −∞, so a row with every key
//! masked (a pad query) stays finite. Linear layers are MatMul nodes over
//! GPT-2's `[in, out]` weights (no Gemm), so quantizers reach every one; the
//! tied head multiplies by the transposed token embedding.

use candle_core::{DType, Tensor};

use super::Gpt2;
use crate::model::{Linear, ModelError};
use crate::onnx::{Attr, Decoder, GraphBuilder, attention_bias, proto, tensor_f32};

fn values(t: &Tensor) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    Ok((
        t.dims().to_vec(),
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// The model as an ONNX graph at standard opset `opset` (17 or later:
/// LayerNormalization).
/// A GPT-2 layer's bias.
fn bias_of(linear: &Linear) -> Result<&Tensor, ModelError> {
    linear
        .bias
        .as_ref()
        .ok_or_else(|| ModelError::Config("a GPT-2 linear layer has no bias".to_string()))
}

pub fn export(model: &Gpt2, opset: i64) -> Result<proto::ModelProto, ModelError> {
    if opset < 17 {
        return Err(ModelError::Config(format!(
            "opset {opset} has no LayerNormalization; use 17 or later"
        )));
    }
    let c = &model.config;
    let (heads, width, head_dim) = (c.n_head as i64, c.n_embd as i64, c.head_dim() as i64);
    let mut g = GraphBuilder::new("gpt2");
    let weight = |g: &mut GraphBuilder, name: &str, t: &Tensor| -> Result<String, ModelError> {
        let (dims, data) = values(t)?;
        Ok(g.initializer(tensor_f32(name, &dims, &data)))
    };
    let io = Decoder::inputs(&mut g, c.n_layer, heads, head_dim);
    let (input_ids, attention_mask, position_ids) =
        (&io.input_ids, &io.attention_mask, &io.position_ids);

    let wte = weight(&mut g, "transformer.wte.weight", &model.wte.weight)?;
    let wpe = weight(&mut g, "transformer.wpe.weight", &model.wpe)?;
    let tokens = g.node("Gather", &[&wte, input_ids], &[("axis", Attr::Int(0))]);
    let positions = g.node("Gather", &[&wpe, position_ids], &[("axis", Attr::Int(0))]);
    let mut x = g.node("Add", &[&tokens, &positions], &[]);

    // Attention bias [batch, 1, sequence, total]: causal and padding.
    let bias = attention_bias(&mut g, input_ids, attention_mask, 4);

    let split = g.constant_i64(&[3], &[width, width, width]);
    let heads_shape = g.constant_i64(&[4], &[0, 0, heads, head_dim]);
    let merged_shape = g.constant_i64(&[3], &[0, 0, width]);
    let scale = g.constant_f32(&[], &[1.0 / (head_dim as f32).sqrt()]);
    let (half, gelu_a, gelu_c, unit) = (
        g.constant_f32(&[], &[0.5]),
        g.constant_f32(&[], &[0.044_715]),
        g.constant_f32(&[], &[(2.0f32 / std::f32::consts::PI).sqrt()]),
        g.constant_f32(&[], &[1.0]),
    );
    let eps = c.layer_norm_epsilon as f32;
    let layer_norm = |g: &mut GraphBuilder, x: &str, w: &str, b: &str| {
        g.node(
            "LayerNormalization",
            &[x, w, b],
            &[("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        )
    };
    let linear = |g: &mut GraphBuilder, x: &str, w: &str, b: &str| {
        let product = g.node("MatMul", &[x, w], &[]);
        g.node("Add", &[&product, b], &[])
    };
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("transformer.h.{i}");
        let ln1 = (
            weight(&mut g, &format!("{p}.ln_1.weight"), &block.ln_1.weight)?,
            weight(&mut g, &format!("{p}.ln_1.bias"), &block.ln_1.bias)?,
        );
        let attn_w = (
            weight(
                &mut g,
                &format!("{p}.attn.c_attn.weight"),
                &block.attn.c_attn.weight,
            )?,
            weight(
                &mut g,
                &format!("{p}.attn.c_attn.bias"),
                bias_of(&block.attn.c_attn)?,
            )?,
        );
        let proj_w = (
            weight(
                &mut g,
                &format!("{p}.attn.c_proj.weight"),
                &block.attn.c_proj.weight,
            )?,
            weight(
                &mut g,
                &format!("{p}.attn.c_proj.bias"),
                bias_of(&block.attn.c_proj)?,
            )?,
        );
        let ln2 = (
            weight(&mut g, &format!("{p}.ln_2.weight"), &block.ln_2.weight)?,
            weight(&mut g, &format!("{p}.ln_2.bias"), &block.ln_2.bias)?,
        );
        let fc_w = (
            weight(
                &mut g,
                &format!("{p}.mlp.c_fc.weight"),
                &block.mlp.c_fc.weight,
            )?,
            weight(
                &mut g,
                &format!("{p}.mlp.c_fc.bias"),
                bias_of(&block.mlp.c_fc)?,
            )?,
        );
        let out_w = (
            weight(
                &mut g,
                &format!("{p}.mlp.c_proj.weight"),
                &block.mlp.c_proj.weight,
            )?,
            weight(
                &mut g,
                &format!("{p}.mlp.c_proj.bias"),
                bias_of(&block.mlp.c_proj)?,
            )?,
        );

        let h = layer_norm(&mut g, &x, &ln1.0, &ln1.1);
        let qkv = linear(&mut g, &h, &attn_w.0, &attn_w.1);
        let parts = g.node_n("Split", None, &[&qkv, &split], &[("axis", Attr::Int(2))], 3);
        let heads_of = |g: &mut GraphBuilder, t: &str| {
            let r = g.node("Reshape", &[t, &heads_shape], &[]);
            g.node(
                "Transpose",
                &[&r],
                &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            )
        };
        let (q, k, v) = (
            heads_of(&mut g, &parts[0]),
            heads_of(&mut g, &parts[1]),
            heads_of(&mut g, &parts[2]),
        );
        let (present_k, present_v) = io.append(&mut g, i, &k, &v);
        let kt = g.node(
            "Transpose",
            &[&present_k],
            &[("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        );
        let scores = g.node("MatMul", &[&q, &kt], &[]);
        let scores = g.node("Mul", &[&scores, &scale], &[]);
        let scores = g.node("Add", &[&scores, &bias], &[]);
        let probs = g.node("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
        let context = g.node("MatMul", &[&probs, &present_v], &[]);
        let context = g.node(
            "Transpose",
            &[&context],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let context = g.node("Reshape", &[&context, &merged_shape], &[]);
        let attn = linear(&mut g, &context, &proj_w.0, &proj_w.1);
        x = g.node("Add", &[&x, &attn], &[]);

        let h = layer_norm(&mut g, &x, &ln2.0, &ln2.1);
        let m = linear(&mut g, &h, &fc_w.0, &fc_w.1);
        let activated = if c.activation_function == "gelu" {
            // The exact form: 0.5·x·(1 + erf(x/√2)).
            let root2 = g.constant_f32(&[], &[std::f32::consts::SQRT_2]);
            let scaled = g.node("Div", &[&m, &root2], &[]);
            let erf = g.node("Erf", &[&scaled], &[]);
            let plus = g.node("Add", &[&erf, &unit], &[]);
            let halved = g.node("Mul", &[&m, &half], &[]);
            g.node("Mul", &[&halved, &plus], &[])
        } else {
            // gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
            let square = g.node("Mul", &[&m, &m], &[]);
            let cube = g.node("Mul", &[&square, &m], &[]);
            let cube = g.node("Mul", &[&cube, &gelu_a], &[]);
            let inner = g.node("Add", &[&m, &cube], &[]);
            let inner = g.node("Mul", &[&inner, &gelu_c], &[]);
            let tanh = g.node("Tanh", &[&inner], &[]);
            let plus = g.node("Add", &[&tanh, &unit], &[]);
            let halved = g.node("Mul", &[&m, &half], &[]);
            g.node("Mul", &[&halved, &plus], &[])
        };
        let m = linear(&mut g, &activated, &out_w.0, &out_w.1);
        x = g.node("Add", &[&x, &m], &[]);
    }
    let lnf = (
        weight(&mut g, "transformer.ln_f.weight", &model.ln_f.weight)?,
        weight(&mut g, "transformer.ln_f.bias", &model.ln_f.bias)?,
    );
    let x = layer_norm(&mut g, &x, &lnf.0, &lnf.1);
    let head = g.node("Transpose", &[&wte], &[("perm", Attr::Ints(vec![1, 0]))]);
    io.outputs(&mut g, &x, &head, c.vocab_size);
    Ok(g.finish(opset))
}
