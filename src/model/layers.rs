//! The pieces every model family is built from: named parameters and the builder
//! that names them from the module tree, dropout, linear layers in either weight
//! layout, layer norm and softmax — each with its composed (reference) form and, where
//! one exists, the fused kernel of [`super::kernels`].

pub use super::kernels::WeightLayout;
use anyhow::{ensure, Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Which implementation runs layer norm, attention, GELU and the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Basic tensor ops only: the reference, and the path for f64 and cached decoding.
    Composed,
    /// The custom ops of [`super::kernels`] (f32 on the CPU).
    Fused,
}

impl Kernels {
    /// Whether the fused kernels run on `x`.
    pub fn fused_for(self, x: &Tensor) -> bool {
        self == Kernels::Fused && super::kernels::supports(x)
    }
}

/// The type a computation on `dtype` values keeps its sums and statistics in: f32
/// for the 16-bit types (mixed precision: layer norm, softmax and the loss), else the
/// type itself.
pub fn widened(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// A named weight in the Hugging Face layout.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// False for the zero biases of a `bias = false` model.
    pub trainable: bool,
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        self.var.as_tensor()
    }

    /// AdamW decays only weights with two or more dimensions (matrices, embeddings).
    pub fn decays(&self) -> bool {
        self.tensor().rank() >= 2
    }
}

/// How a fresh parameter is initialised.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal(f64),
    Zeros,
    Ones,
}

/// Where a model's weights come from: `make(name, shape, init)` returns the tensor
/// for one parameter (drawn fresh, read from a file, or converted from another
/// model). Fresh initialisation and loading both go through a model's `build`, so
/// names and shapes are defined in one place.
pub type MakeParam<'a> = dyn FnMut(&str, &[usize], Init) -> Result<Tensor> + 'a;

/// The shape every transformer family shares, under each family's own key names, as
/// checked before anything is allocated for it.
pub struct Shape<'a> {
    /// (key, value) of the vocabulary, positions, layers, heads, width and MLP width.
    pub vocab: (&'a str, usize),
    pub positions: (&'a str, usize),
    pub layers: (&'a str, usize),
    pub heads: (&'a str, usize),
    pub width: (&'a str, usize),
    pub ffn: (&'a str, usize),
    pub dropout: f32,
    pub labels: usize,
}

impl Shape<'_> {
    /// Positive sizes, heads dividing the width, dropout in [0, 1), two or more labels
    /// for a classifier, and no absurd size (at most 2^33 parameters).
    pub fn validate(&self) -> Result<()> {
        let [vocab, positions, layers, heads, width, ffn] = [
            self.vocab,
            self.positions,
            self.layers,
            self.heads,
            self.width,
            self.ffn,
        ];
        for (key, value, max) in [
            (vocab, 1 << 24),
            (positions, 1 << 20),
            (layers, 1 << 10),
            (heads, 1 << 10),
            (width, 1 << 16),
            (ffn, 1 << 18),
        ]
        .map(|((k, v), max)| (k, v, max))
        {
            ensure!(value > 0, "{key} must be positive");
            ensure!(
                value <= max,
                "{key} = {value} is beyond the supported maximum of {max}"
            );
        }
        ensure!(
            width.1.is_multiple_of(heads.1),
            "{} ({}) must be a multiple of {} ({})",
            width.0,
            width.1,
            heads.0,
            heads.1
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "dropout {} must be in [0, 1)",
            self.dropout
        );
        ensure!(
            self.labels != 1,
            "a classifier needs at least 2 labels (regression is not supported)"
        );
        let (c, f) = (width.1 as u128, ffn.1 as u128);
        let params =
            (vocab.1 + positions.1) as u128 * c + layers.1 as u128 * (4 * c * c + 2 * c * f);
        ensure!(
            params <= 1 << 33,
            "a model of {params} parameters is beyond the supported maximum of 2^33"
        );
        Ok(())
    }
}

/// Where a parameter sits in `params` (a model's `params()`), found by identity: how
/// the hand-written steps find each named weight's gradient buffer.
pub fn position_in<'a>(params: &'a [&'a Param]) -> impl Fn(&Param) -> usize + 'a {
    move |p| {
        params
            .iter()
            .position(|q| std::ptr::eq(*q, p))
            .expect("every weight is in params()")
    }
}

/// Fresh weights drawn from a generator seeded with `seed`, in the order the model
/// asks for them: what `init` passes to a model's `build`.
pub fn fresh(
    seed: u64,
    device: &Device,
) -> impl FnMut(&str, &[usize], Init) -> Result<Tensor> + '_ {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    move |_, shape, init| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => {
                let normal = rand_distr::Normal::new(0.0f32, std as f32)?;
                (0..n).map(|_| rng.sample(normal)).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

/// Another model's weights, by name, in `dtype`: what `to_dtype` passes to `build`.
pub fn copied<'a>(
    params: &'a [&'a Param],
    dtype: DType,
) -> impl FnMut(&str, &[usize], Init) -> Result<Tensor> + 'a {
    move |name, _, _| {
        let p = params
            .iter()
            .find(|p| p.name == name)
            .context("parameter list out of sync")?;
        Ok(p.tensor().to_dtype(dtype)?)
    }
}

/// Names parameters from the module tree, as candle's `VarBuilder::pp` does:
/// `root.pp("encoder").pp(0).pp("attention")` names `encoder.0.attention.…`.
pub struct ParamBuilder<'a, 'm> {
    make: &'a mut MakeParam<'m>,
    prefix: String,
}

impl<'a, 'm> ParamBuilder<'a, 'm> {
    pub fn root(make: &'a mut MakeParam<'m>) -> Self {
        ParamBuilder {
            make,
            prefix: String::new(),
        }
    }

    /// The builder one module further down the tree.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> ParamBuilder<'_, 'm> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        ParamBuilder {
            make: &mut *self.make,
            prefix,
        }
    }

    /// The parameter `name` under this module, checked to have `shape`.
    pub fn param(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        trainable: bool,
    ) -> Result<Param> {
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        let t = (self.make)(&full, shape, init)?;
        ensure!(
            t.dims() == shape,
            "{full}: expected shape {shape:?}, found {:?}",
            t.dims()
        );
        Ok(Param {
            var: Var::from_tensor(&t)?,
            name: full,
            trainable,
        })
    }

    /// A linear layer named `weight` and `bias` under this module.
    pub fn linear(
        &mut self,
        layout: WeightLayout,
        n_in: usize,
        n_out: usize,
        std: f64,
        bias_trainable: bool,
    ) -> Result<Linear> {
        let shape = match layout {
            WeightLayout::InOut => [n_in, n_out],
            WeightLayout::OutIn => [n_out, n_in],
        };
        Ok(Linear {
            weight: self.param("weight", &shape, Init::Normal(std), true)?,
            bias: self.param("bias", &[n_out], Init::Zeros, bias_trainable)?,
            layout,
            quantized: None,
        })
    }

    /// A layer norm of width `c`, named `weight` and `bias` under this module.
    pub fn layer_norm(&mut self, c: usize, eps: f64, bias_trainable: bool) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.param("weight", &[c], Init::Ones, true)?,
            bias: self.param("bias", &[c], Init::Zeros, bias_trainable)?,
            eps,
        })
    }
}

/// Dropout with its own seeded generator, so masks are reproducible and resumable.
pub struct Dropout {
    pub p: f32,
    pub rng: ChaCha8Rng,
}

impl Dropout {
    fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.random::<f32>() < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }
}

/// `x` through dropout when one is given (training), unchanged otherwise.
pub fn apply_dropout(x: Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(&x),
        None => Ok(x),
    }
}

pub struct Linear {
    pub weight: Param,
    pub bias: Param,
    pub layout: WeightLayout,
    /// The weight quantised (a GGUF's), `(out, in)`: when set, inference multiplies
    /// by it instead of `weight` (which keeps the dequantised values for `params`).
    pub quantized: Option<QMatMul>,
}

impl Linear {
    /// The layer over the last dimension of `x`, in `x`'s type (the f32 weights are
    /// cast to it under mixed precision).
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if let Some(q) = &self.quantized {
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let x = x.reshape((rows, dims[dims.len() - 1]))?.contiguous()?;
            let y = q.forward(&x)?.broadcast_add(self.bias.tensor())?;
            let mut out_dims = dims;
            *out_dims.last_mut().unwrap() = y.dim(1)?;
            return Ok(y.reshape(out_dims)?);
        }
        let w = &self.weight.tensor().to_dtype(x.dtype())?;
        let bias = &self.bias.tensor().to_dtype(x.dtype())?;
        let (n_in, n_out) = match self.layout {
            WeightLayout::InOut => w.dims2()?,
            WeightLayout::OutIn => {
                let (o, i) = w.dims2()?;
                (i, o)
            }
        };
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((rows, n_in))?;
        let y = match self.layout {
            _ if kernels.fused_for(&x) => super::kernels::linear(&x, w, bias, self.layout)?,
            WeightLayout::InOut => x.matmul(w)?.broadcast_add(bias)?,
            WeightLayout::OutIn => x.matmul(&w.t()?)?.broadcast_add(bias)?,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = n_out;
        Ok(y.reshape(out_dims)?)
    }
}

pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.fused_for(x) {
            return Ok(super::kernels::layer_norm(
                x,
                self.weight.tensor(),
                self.bias.tensor(),
                self.eps,
            )?);
        }
        // Statistics of 16-bit activations in f32; the result in the input's type.
        let (dtype, work) = (x.dtype(), widened(x.dtype()));
        let x = x.to_dtype(work)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight.tensor().to_dtype(work)?)?
            .broadcast_add(&self.bias.tensor().to_dtype(work)?)?
            .to_dtype(dtype)?)
    }
}

/// Softmax over the last dimension. The max is detached: softmax does not depend on
/// the shift, so its gradient is zero and skipping it is exact. 16-bit inputs are
/// exponentiated and summed in f32.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(widened(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(dtype)?)
}

/// `(B, T, C)` → `(B, heads, T, C / heads)`, contiguous.
pub fn split_heads(x: &Tensor, n_head: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    Ok(x.reshape((b, t, n_head, c / n_head))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// softmax(q kᵀ / √d + mask) v over heads `(B, H, T, d)`, merged back to `(B, T, H·d)`.
/// `mask` is additive and broadcasts against the `(B, H, T, T_k)` scores: 0 where a
/// query may look, a large negative number where it may not.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dropout: Option<&mut Dropout>,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let att = apply_dropout(softmax_last_dim(&scores)?, dropout)?;
    Ok(att.matmul(v)?.transpose(1, 2)?.reshape((b, t, h * hd))?)
}
