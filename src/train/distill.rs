//! Knowledge distillation, as DistilBERT and DistilGPT2 were made (Sanh et al. 2019,
//! transformers' `examples/research_projects/distillation`): a student of fewer
//! layers, initialised from the teacher's, learns
//!
//! ```text
//! α_ce · KL(softmax(t/τ) ‖ softmax(s/τ)) · τ²   (mean over the predicted positions)
//! + α_lm · cross-entropy of s on the labels      (mean over the same positions)
//! + α_cos · (1 − cos(h_s, h_t))                   (mean over the non-pad positions)
//! ```
//!
//! where the predicted positions are every position of a causal LM and the selected
//! positions of a masked LM, `t`/`s` the teacher's and student's logits and `h` their
//! last hidden states. The teacher runs forward only, detached from the graph.
//!
//! Each term is returned as a sum the trainer divides by the global count of predicted
//! positions (like every loss here); the cosine term is pre-scaled by
//! predicted / non-pad positions of the global batch, so N ranks equal one process.

use crate::data::Batch;
use crate::model::bert::IGNORE;
use crate::model::{Dropout, Model};
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor, D};

/// The loss weights and temperature (defaults: the DistilBERT paper's run).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillSpec {
    pub temperature: f64,
    pub alpha_ce: f64,
    pub alpha_lm: f64,
    pub alpha_cos: f64,
}

/// The three terms of one batch, each a differentiable sum (see the module docs).
pub struct DistillTerms {
    /// Σ over predicted positions of KL(t/τ ‖ s/τ) · τ².
    pub kl: Tensor,
    /// Σ over predicted positions of the student's cross-entropy on the labels.
    pub lm: Tensor,
    /// Σ over non-pad positions of 1 − cos(h_s, h_t).
    pub cos: Tensor,
    pub predicted: usize,
    pub hidden: usize,
}

impl DistillTerms {
    /// α-weighted, with the cosine sum rescaled to the predicted-position count
    /// (`predicted_global / hidden_global`, counts over all ranks).
    pub fn weighted_sum(&self, spec: &DistillSpec, counts: (usize, usize)) -> Result<Tensor> {
        let (predicted, hidden) = (counts.0.max(1) as f64, counts.1.max(1) as f64);
        let kl = (&self.kl * spec.alpha_ce)?;
        let lm = (&self.lm * spec.alpha_lm)?;
        let cos = (&self.cos * (spec.alpha_cos * predicted / hidden))?;
        Ok(((kl + lm)? + cos)?)
    }
}

/// The terms from logits `(N, V)` at the N predicted positions (`labels`, one each),
/// and hidden states `(M, C)` at the M non-pad positions; the teacher's are detached.
pub fn terms(
    student: (&Tensor, &Tensor),
    teacher: (&Tensor, &Tensor),
    labels: &Tensor,
    temperature: f64,
) -> Result<DistillTerms> {
    let (s_logits, s_hidden) = student;
    let (t_logits, t_hidden) = (teacher.0.detach(), teacher.1.detach());
    ensure!(
        s_logits.dims() == t_logits.dims(),
        "student logits {:?} and teacher logits {:?} differ in shape",
        s_logits.dims(),
        t_logits.dims()
    );
    ensure!(
        s_hidden.dims() == t_hidden.dims(),
        "the student's hidden states {:?} and the teacher's {:?} differ in shape (distillation needs the same width)",
        s_hidden.dims(),
        t_hidden.dims()
    );
    let log_p_s = log_softmax(&(s_logits / temperature)?)?;
    let log_p_t = log_softmax(&(t_logits / temperature)?)?;
    let p_t = log_p_t.exp()?;
    let kl = ((p_t * (log_p_t - log_p_s)?)?.sum_all()? * (temperature * temperature))?;
    let lm = crate::model::gpt::cross_entropy_rows(s_logits, labels)?.sum_all()?;
    let dot = (s_hidden * &t_hidden)?.sum(D::Minus1)?;
    let norms =
        (s_hidden.sqr()?.sum(D::Minus1)?.sqrt()? * t_hidden.sqr()?.sum(D::Minus1)?.sqrt()?)?;
    // torch's cosine_similarity clamps the norm product at 1e-8.
    let cos = (dot / norms.clamp(1e-8, f64::INFINITY)?)?;
    let cos = (1.0 - cos)?.sum_all()?;
    Ok(DistillTerms {
        kl,
        lm,
        cos,
        predicted: s_logits.dim(0)?,
        hidden: s_hidden.dim(0)?,
    })
}

/// Numerically stable log-softmax over the last dimension, differentiable.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The distillation loss of `batch` for `student` against `teacher` (both of one
/// family), as the sum the trainer divides by `batch.loss_positions`, and the number
/// of predicted positions in this micro-batch.
pub fn loss_sum(
    student: &Model,
    teacher: &Model,
    batch: &Batch,
    dropout: Option<&mut Dropout>,
    spec: &DistillSpec,
) -> Result<(Tensor, usize)> {
    let device = student.device();
    let shape = (batch.batch_size, batch.block_size);
    let ids = Tensor::from_slice(&batch.inputs, shape, device)?;
    let mask = batch
        .attention_mask
        .as_ref()
        .map(|m| Tensor::from_slice(m, shape, device))
        .transpose()?;
    // Rows of the flattened (B·T) positions: predicted ones, and non-pad ones.
    let predicted: Vec<u32> = (0..batch.targets.len() as u32)
        .filter(|&i| batch.targets[i as usize] != IGNORE)
        .collect();
    let labels: Vec<u32> = predicted
        .iter()
        .map(|&i| batch.targets[i as usize])
        .collect();
    let non_pad: Vec<u32> = match &batch.attention_mask {
        Some(m) => (0..m.len() as u32)
            .filter(|&i| m[i as usize] != 0)
            .collect(),
        None => (0..batch.inputs.len() as u32).collect(),
    };
    if predicted.is_empty() {
        return Ok((Tensor::zeros((), student.dtype(), device)?, 0));
    }
    let rows = |idx: &[u32]| Tensor::new(idx, device);
    let (predicted_rows, hidden_rows) = (rows(&predicted)?, rows(&non_pad)?);
    let outputs = |m: &Model, dropout: Option<&mut Dropout>| -> Result<(Tensor, Tensor)> {
        let hidden = match m {
            Model::Gpt(g) => g.hidden_states(&ids, None, dropout)?,
            Model::Bert(b) => b.hidden_states(&ids, None, mask.as_ref(), dropout)?,
        };
        let c = hidden.dim(D::Minus1)?;
        let flat = hidden.reshape((batch.inputs.len(), c))?;
        let at_predicted = flat.index_select(&predicted_rows, 0)?;
        let logits = match m {
            Model::Gpt(g) => g.lm_logits(&at_predicted)?,
            Model::Bert(b) => b.mlm_logits(&at_predicted)?,
        };
        Ok((logits, flat.index_select(&hidden_rows, 0)?))
    };
    match (student, teacher) {
        (Model::Gpt(_), Model::Gpt(_)) | (Model::Bert(_), Model::Bert(_)) => {}
        _ => bail!("the student and the teacher must be of one family"),
    }
    let (t_logits, t_hidden) = outputs(teacher, None)?;
    let (s_logits, s_hidden) = outputs(student, dropout)?;
    let labels = Tensor::new(labels, device)?;
    let t = terms(
        (&s_logits, &s_hidden),
        (
            &t_logits.to_dtype(s_logits.dtype())?,
            &t_hidden.to_dtype(s_hidden.dtype())?,
        ),
        &labels,
        spec.temperature,
    )?;
    // Without padding (a causal LM's windows) every predicted position is a hidden one.
    let hidden_global = batch.hidden_positions.unwrap_or(batch.loss_positions);
    let sum = t.weighted_sum(spec, (batch.loss_positions, hidden_global))?;
    Ok((sum.to_dtype(DType::F32)?, t.predicted))
}

/// Which of a teacher's `teacher_layers` layers a student of `student_layers` keeps:
/// evenly spaced from the first to the last, rounded (6 of 12 gives transformers'
/// DistilBERT choice, 0 2 4 7 9 11; 2 of 4 gives 0 3; 1 gives the first).
pub fn layer_map(teacher_layers: usize, student_layers: usize) -> Result<Vec<usize>> {
    ensure!(
        (1..=teacher_layers).contains(&student_layers),
        "a student of {student_layers} layers from a teacher of {teacher_layers}: expected 1 to {teacher_layers}"
    );
    if student_layers == 1 {
        return Ok(vec![0]);
    }
    let step = (teacher_layers - 1) as f64 / (student_layers - 1) as f64;
    Ok((0..student_layers)
        .map(|i| (i as f64 * step).round() as usize)
        .collect())
}
