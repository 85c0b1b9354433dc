//! `lmforge fill-mask`: the most likely tokens at each [MASK] of a sequence, as
//! transformers' `pipeline("fill-mask")` gives them.

use crate::model::Bert;
use anyhow::{ensure, Result};
use candle_core::Tensor;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub id: u32,
    /// The token's text, where the model has a tokenizer.
    pub token: Option<String>,
    pub probability: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaskFill {
    pub position: usize,
    pub candidates: Vec<Candidate>,
}

/// The `top_k` candidates at every position of `ids` that holds `mask_id`;
/// `token` names an id.
pub fn fill_mask(
    model: &Bert,
    ids: &[u32],
    mask_id: u32,
    top_k: usize,
    token: impl Fn(u32) -> Option<String>,
) -> Result<Vec<MaskFill>> {
    let positions: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
    ensure!(
        !positions.is_empty(),
        "the input has no [MASK] token (id {mask_id})"
    );
    let device = model.device();
    let x = Tensor::new(ids, device)?.unsqueeze(0)?;
    let hidden = model.hidden_states(&x, None, None, None)?.squeeze(0)?;
    let rows = Tensor::new(
        positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
        device,
    )?;
    let logits = model.mlm_logits(&hidden.index_select(&rows, 0)?)?;
    let probs = crate::model::layers::softmax_last_dim(&logits.to_dtype(candle_core::DType::F64)?)?;
    let probs: Vec<Vec<f64>> = probs.to_vec2()?;
    Ok(positions
        .into_iter()
        .zip(probs)
        .map(|(position, p)| {
            let mut order: Vec<usize> = (0..p.len()).collect();
            // Highest first; ties by id, so the order is stable.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            MaskFill {
                position,
                candidates: order
                    .into_iter()
                    .take(top_k)
                    .map(|i| Candidate {
                        id: i as u32,
                        token: token(i as u32),
                        probability: p[i],
                    })
                    .collect(),
            }
        })
        .collect())
}
