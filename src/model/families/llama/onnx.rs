//! The Llama family (llama, qwen2) lowered to ONNX with a grouped-query KV
//! cache, named as transformers.js reads it, in standard ONNX ops (what
//! optimum writes for these models).
//!
//! Inputs and outputs are the decoder contract ([`Decoder`](crate::onnx::Decoder)). The
//! cache holds the `num_key_value_heads` key-value heads only: the
//! query heads of a group are stacked against their shared head
//! (`[b, kv, group, s, d]` against `[b, kv, 1, d, total]`, MatMul
//! broadcasting), so nothing is repeated.
//!
//! Rotary embeddings are computed once from `position_ids` (the config's
//! frequencies, `llama3` scaling included, as constants) and applied in the
//! "rotate half" form; RMSNorm is `x / √(mean(x²) + ε) · w`; the MLP is
//! `down(silu(gate(x)) · up(x))`. Linear weights become `[in, out]`
//! initializers of MatMul nodes (transposed from the checkpoint's `[out,
//! in]`), so the quantizers reach every projection; a tied head multiplies
//! by the transposed embedding, as GPT-2's does.

use candle_core::{DType, Tensor};

use super::Llama;
use crate::model::layers::WeightLayout;
use crate::model::{Linear, ModelError};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::{Attr, Decoder, GraphBuilder, attention_bias, proto, tensor_f32};

/// A linear layer's weight as an `[in, out]` initializer, and its bias.
fn linear_weights(
    g: &mut GraphBuilder,
    name: &str,
    linear: &Linear,
) -> Result<(String, Option<String>), ModelError> {
    let (n_in, n_out) = linear.dims()?;
    let weight = match linear.layout {
        WeightLayout::OutIn => linear.weight.t()?,
        WeightLayout::InOut => linear.weight.clone(),
    };
    let data = weight
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let w = g.initializer(tensor_f32(&format!("{name}.weight"), &[n_in, n_out], &data));
    let b = match &linear.bias {
        Some(bias) => Some(g.initializer(tensor_f32(
            &format!("{name}.bias"),
            &[n_out],
            &bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        ))),
        None => None,
    };
    Ok((w, b))
}

fn vector(g: &mut GraphBuilder, name: &str, t: &Tensor) -> Result<String, ModelError> {
    Ok(g.initializer(tensor_f32(
        name,
        t.dims(),
        &t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    )))
}

/// The model as an ONNX graph at standard opset `opset` (17 to 21).
pub fn export(model: &Llama, opset: i64) -> Result<proto::ModelProto, ModelError> {
    let c = &model.config;
    let (heads, kv_heads, head_dim) = (
        c.num_attention_heads as i64,
        c.kv_heads() as i64,
        c.head_dim() as i64,
    );
    let group = heads / kv_heads;
    let mut g = GraphBuilder::new(model.family.model_type());
    let io = Decoder::inputs(&mut g, c.num_hidden_layers, kv_heads, head_dim);
    let (input_ids, attention_mask, position_ids) =
        (&io.input_ids, &io.attention_mask, &io.position_ids);

    let embed = vector(
        &mut g,
        "model.embed_tokens.weight",
        &model.embed_tokens.weight,
    )?;
    let mut x = g.node("Gather", &[&embed, input_ids], &[("axis", Attr::Int(0))]);

    // Attention bias [batch, 1, 1, sequence, total]: causal and padding.
    let bias = attention_bias(&mut g, input_ids, attention_mask, 5);
    let axis_1 = g.constant_i64(&[1], &[1]);

    // cos and sin [batch, 1, sequence, head_dim] from the position ids,
    // in float32 as transformers computes them.
    let (inv_freq, scaling) = model.rotary();
    let inv_freq = g.constant_f32(&[inv_freq.len()], inv_freq);
    let positions = g.node(
        "Cast",
        &[position_ids],
        &[("to", Attr::Int(DataType::Float as i64))],
    );
    let last = g.constant_i64(&[1], &[-1]);
    let positions = g.node("Unsqueeze", &[&positions, &last], &[]);
    let freqs = g.node("Mul", &[&positions, &inv_freq], &[]);
    let angles = g.node("Concat", &[&freqs, &freqs], &[("axis", Attr::Int(-1))]);
    let angles = g.node("Unsqueeze", &[&angles, &axis_1], &[]);
    let (mut cos, mut sin) = (
        g.node("Cos", &[&angles], &[]),
        g.node("Sin", &[&angles], &[]),
    );
    if scaling != 1.0 {
        let factor = g.constant_f32(&[], &[scaling]);
        cos = g.node("Mul", &[&cos, &factor], &[]);
        sin = g.node("Mul", &[&sin, &factor], &[]);
    }
    let halves = g.constant_i64(&[2], &[head_dim / 2, head_dim / 2]);
    let rotate = |g: &mut GraphBuilder, t: &str| {
        // t·cos + rotate_half(t)·sin, rotate_half([a, b]) = [−b, a].
        let parts = g.node_n("Split", None, &[t, &halves], &[("axis", Attr::Int(-1))], 2);
        let negated = g.node("Neg", &[&parts[1]], &[]);
        let rotated = g.node("Concat", &[&negated, &parts[0]], &[("axis", Attr::Int(-1))]);
        let a = g.node("Mul", &[t, &cos], &[]);
        let b = g.node("Mul", &[&rotated, &sin], &[]);
        g.node("Add", &[&a, &b], &[])
    };

    let eps = g.constant_f32(&[], &[c.rms_norm_eps as f32]);
    let reduce_axes = g.constant_i64(&[1], &[-1]);
    let rms_norm = |g: &mut GraphBuilder, x: &str, w: &str| {
        let square = g.node("Mul", &[x, x], &[]);
        let mean = if opset >= 18 {
            g.node(
                "ReduceMean",
                &[&square, &reduce_axes],
                &[("keepdims", Attr::Int(1))],
            )
        } else {
            g.node(
                "ReduceMean",
                &[&square],
                &[("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
            )
        };
        let shifted = g.node("Add", &[&mean, &eps], &[]);
        let root = g.node("Sqrt", &[&shifted], &[]);
        let normed = g.node("Div", &[x, &root], &[]);
        g.node("Mul", &[&normed, w], &[])
    };
    let linear = |g: &mut GraphBuilder, x: &str, (w, b): &(String, Option<String>)| {
        let product = g.node("MatMul", &[x, w], &[]);
        match b {
            Some(b) => g.node("Add", &[&product, b], &[]),
            None => product,
        }
    };
    let split_heads = |g: &mut GraphBuilder, t: &str, n: i64| {
        let shape = g.constant_i64(&[4], &[0, 0, n, head_dim]);
        let r = g.node("Reshape", &[t, &shape], &[]);
        g.node(
            "Transpose",
            &[&r],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )
    };
    // Queries [b, h, s, d] → [b, kv, group, s, d]; keys and values [b, kv, t, d] → [b, kv, 1, t, d].
    let grouped_shape = g.constant_i64(&[5], &[0, kv_heads, group, -1, head_dim]);
    let axis_2 = g.constant_i64(&[1], &[2]);
    let heads_shape = g.constant_i64(&[4], &[0, heads, -1, head_dim]);
    let merged_shape = g.constant_i64(&[3], &[0, 0, heads * head_dim]);
    let scale = g.constant_f32(&[], &[1.0 / (head_dim as f32).sqrt()]);

    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let input_norm = vector(
            &mut g,
            &format!("{p}.input_layernorm.weight"),
            &layer.input_layernorm.weight,
        )?;
        let post_norm = vector(
            &mut g,
            &format!("{p}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm.weight,
        )?;
        let a = &layer.self_attn;
        let (q_w, k_w, v_w, o_w) = (
            linear_weights(&mut g, &format!("{p}.self_attn.q_proj"), &a.q_proj)?,
            linear_weights(&mut g, &format!("{p}.self_attn.k_proj"), &a.k_proj)?,
            linear_weights(&mut g, &format!("{p}.self_attn.v_proj"), &a.v_proj)?,
            linear_weights(&mut g, &format!("{p}.self_attn.o_proj"), &a.o_proj)?,
        );
        let m = &layer.mlp;
        let (gate_w, up_w, down_w) = (
            linear_weights(&mut g, &format!("{p}.mlp.gate_proj"), &m.gate_proj)?,
            linear_weights(&mut g, &format!("{p}.mlp.up_proj"), &m.up_proj)?,
            linear_weights(&mut g, &format!("{p}.mlp.down_proj"), &m.down_proj)?,
        );

        let h = rms_norm(&mut g, &x, &input_norm);
        let q = linear(&mut g, &h, &q_w);
        let k = linear(&mut g, &h, &k_w);
        let v = linear(&mut g, &h, &v_w);
        let (q, k, v) = (
            split_heads(&mut g, &q, heads),
            split_heads(&mut g, &k, kv_heads),
            split_heads(&mut g, &v, kv_heads),
        );
        let (q, k) = (rotate(&mut g, &q), rotate(&mut g, &k));
        let (present_k, present_v) = io.append(&mut g, i, &k, &v);
        let q = g.node("Reshape", &[&q, &grouped_shape], &[]);
        let k = g.node("Unsqueeze", &[&present_k, &axis_2], &[]);
        let v = g.node("Unsqueeze", &[&present_v, &axis_2], &[]);
        let kt = g.node(
            "Transpose",
            &[&k],
            &[("perm", Attr::Ints(vec![0, 1, 2, 4, 3]))],
        );
        let scores = g.node("MatMul", &[&q, &kt], &[]);
        let scores = g.node("Mul", &[&scores, &scale], &[]);
        let scores = g.node("Add", &[&scores, &bias], &[]);
        let probs = g.node("Softmax", &[&scores], &[("axis", Attr::Int(-1))]);
        let context = g.node("MatMul", &[&probs, &v], &[]);
        let context = g.node("Reshape", &[&context, &heads_shape], &[]);
        let context = g.node(
            "Transpose",
            &[&context],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let context = g.node("Reshape", &[&context, &merged_shape], &[]);
        let attended = linear(&mut g, &context, &o_w);
        x = g.node("Add", &[&x, &attended], &[]);

        let h = rms_norm(&mut g, &x, &post_norm);
        let gate = linear(&mut g, &h, &gate_w);
        let up = linear(&mut g, &h, &up_w);
        let sigmoid = g.node("Sigmoid", &[&gate], &[]);
        let silu = g.node("Mul", &[&gate, &sigmoid], &[]);
        let gated = g.node("Mul", &[&silu, &up], &[]);
        let down = linear(&mut g, &gated, &down_w);
        x = g.node("Add", &[&x, &down], &[]);
    }
    let norm = vector(&mut g, "model.norm.weight", &model.norm.weight)?;
    let x = rms_norm(&mut g, &x, &norm);
    let head = match &model.lm_head {
        // Untied: `lm_head` as an [in, vocab] initializer.
        Some(head) => {
            let data = head
                .weight
                .to_dtype(DType::F32)?
                .t()?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            g.initializer(tensor_f32(
                "lm_head.weight",
                &[c.hidden_size, c.vocab_size],
                &data,
            ))
        }
        None => g.node("Transpose", &[&embed], &[("perm", Attr::Ints(vec![1, 0]))]),
    };
    io.outputs(&mut g, &x, &head, c.vocab_size);
    Ok(g.finish(opset))
}
