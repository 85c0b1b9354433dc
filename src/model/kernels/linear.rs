//! `x @ W + b` as one op, W stored (in, out) (HF's Conv1D layout, GPT-2) or (out, in)
//! (`nn.Linear`, BERT): the product reads either through strides. The bias (plus,
//! in the hand-written step, the residual it adds to) is written into the output
//! first and the matrix product accumulates onto it in the same `gemm` call candle's
//! matmul makes, so there is no separate bias pass and, in training, no second
//! `(rows, out)` activation kept alive for backward. The backward is two products
//! and a column sum. Both directions give each thread its own share of the rows and
//! one single-threaded product per share: the shares cost the same, so no thread
//! waits on another mid-op, and small products are not split below where `gemm` is
//! efficient (measured on the small preset's shapes: 7 % faster forward and
//! backward than `gemm`'s own threading or one product per thread).

use super::{contiguous3, matmul, output, packed3, unpack3, Grads3};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// (in, out): GPT-2's Conv1D, the layer is `x @ W + b`.
    InOut,
    /// (out, in): `nn.Linear` (BERT), the layer is `x @ Wᵀ + b`.
    OutIn,
}

impl WeightLayout {
    /// W as the right operand of `x @ W` (`n_in × n_out`): (column, row) strides.
    fn strides(self, n_in: usize, n_out: usize) -> (usize, usize) {
        match self {
            WeightLayout::InOut => (1, n_out),
            WeightLayout::OutIn => (n_in, 1),
        }
    }
}

struct Linear(WeightLayout);
struct LinearBackward(WeightLayout);

/// `x (rows, in) @ W + bias (out)` for a weight stored as `layout` says,
/// differentiable in all three.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear(layout))
}

/// A row-wise pass fused after a product (GELU, the next layer norm): it runs on
/// each thread's share of the output rows as soon as that share's product is done,
/// while the rows are still in the thread's cache, instead of as a separate pass over
/// the whole output later. It reads the share's output rows and writes the same rows
/// of another buffer, as wide as the output.
pub type Then<'a> = (&'a mut [f32], &'a (dyn Fn(&[f32], &mut [f32]) + Sync));

/// The same after a backward product, in place on the share of dx (row range given).
pub type ThenInPlace<'a> = &'a (dyn Fn(Range<usize>, &mut [f32]) + Sync);

/// `y = base + x @ w + b`, with `base` (a residual stream, as wide as `y`) optional;
/// `y` may not alias `base`. Each thread takes a share of the rows: it writes the
/// bias (and residual) into its rows of `y`, accumulates its single-threaded
/// product onto them, then runs `then` on them.
pub fn forward(
    x: &[f32],
    (w, layout): (&[f32], WeightLayout),
    b: &[f32],
    base: Option<&[f32]>,
    y: &mut [f32],
    then: Option<Then>,
) {
    let n_out = b.len();
    let n_in = w.len() / n_out;
    let rows = x.len() / n_in;
    let (w_cs, w_rs) = layout.strides(n_in, n_out);
    let shares = per_thread(&mut y[..rows * n_out], n_out);
    let (into, pass) = match then {
        Some((into, pass)) => (per_thread(&mut into[..rows * n_out], n_out), Some(pass)),
        None => (Vec::new(), None),
    };
    let into = into.into_iter().map(|(_, s)| Some(s));
    // Empty shares are dropped: a task for one would wake a pool thread for nothing
    // (one token at a time, in generation, fills a single share).
    let shares: Vec<_> = shares
        .into_iter()
        .zip(into.chain(std::iter::repeat_with(|| None)))
        .filter(|((r, _), _)| !r.is_empty())
        .collect();
    shares.into_par_iter().for_each(|((r, y), into)| {
        match base {
            Some(base) => {
                let base = &base[r.start * n_out..r.end * n_out];
                for (y, base) in y.chunks_exact_mut(n_out).zip(base.chunks_exact(n_out)) {
                    y.iter_mut()
                        .zip(base.iter().zip(b))
                        .for_each(|(y, (r, b))| *y = r + b);
                }
            }
            None => y.chunks_exact_mut(n_out).for_each(|y| y.copy_from_slice(b)),
        }
        matmul(
            (r.len(), n_out, n_in),
            (y, n_out),
            true,
            (&x[r.start * n_in..], 1, n_in),
            (w, w_cs, w_rs),
            false,
        );
        if let (Some(pass), Some(into)) = (pass, into) {
            pass(y, into);
        }
    });
}

/// Given `dy`: `dx = dy Wᵀ` (overwritten, then passed through `then_dx` share by
/// share), `dw += xᵀ dy` (or `dyᵀ x` for an (out, in) weight), `db += Σ_rows dy`.
/// Each thread takes a share of dx's rows, of dw's rows and of db: equal work per
/// thread and no product split further.
pub fn backward(
    x: &[f32],
    (w, layout): (&[f32], WeightLayout),
    dy: &[f32],
    (dx, then_dx): (&mut [f32], Option<ThenInPlace>),
    dw: &mut [f32],
    db: &mut [f32],
) {
    let n_out = db.len();
    let n_in = w.len() / n_out;
    let rows = x.len() / n_in;
    let (w_cs, w_rs) = layout.strides(n_in, n_out);
    let dx = per_thread(&mut dx[..rows * n_in], n_in);
    // dw's rows: inputs for (in, out), outputs for (out, in).
    let dw_width = match layout {
        WeightLayout::InOut => n_out,
        WeightLayout::OutIn => n_in,
    };
    let dw = per_thread(dw, dw_width);
    let db = per_thread(db, 1);
    let shares: Vec<_> = (dx.into_iter().zip(dw).zip(db))
        .filter(|(((r, _), (i, _)), (j, _))| !(r.is_empty() && i.is_empty() && j.is_empty()))
        .collect();
    shares
        .into_par_iter()
        .for_each(|(((r, dx), (i, dw)), (j, db))| {
            matmul(
                (r.len(), n_in, n_out),
                (dx, n_in),
                false,
                (&dy[r.start * n_out..], 1, n_out),
                // Wᵀ: the transpose of x @ W's right operand.
                (w, w_rs, w_cs),
                false,
            );
            if let Some(then) = then_dx {
                then(r, dx);
            }
            match layout {
                WeightLayout::InOut => matmul(
                    (i.len(), n_out, rows),
                    (dw, n_out),
                    true,
                    (&x[i.start..], n_in, 1),
                    (dy, 1, n_out),
                    false,
                ),
                WeightLayout::OutIn => matmul(
                    (i.len(), n_in, rows),
                    (dw, n_in),
                    true,
                    (&dy[i.start..], n_out, 1),
                    (x, 1, n_in),
                    false,
                ),
            }
            for row in dy.chunks_exact(n_out) {
                db.iter_mut()
                    .zip(&row[j.clone()])
                    .for_each(|(p, x)| *p += x);
            }
        });
}

/// Fewest rows in a share of `width` columns, unless the whole has fewer. `gemm`
/// sums in a different order for products with both sides ≤ 64, and for single
/// rows or ≤ 256 outputs; a share wider than 64 with at least 8 rows, or one of at
/// least 65 rows, takes the same path as the whole product, so every element is
/// summed in the same order however many threads there are. (The small preset's
/// weight gradients are 128 rows: with a 65-row minimum one thread did them all.)
fn min_share(width: usize) -> usize {
    if width > 64 {
        8
    } else {
        65
    }
}

/// `data` (rows of `width`) cut into one run of whole rows per pool thread, nearly
/// equal and at least [`min_share`] rows (the shares left over are empty), each
/// with its row range.
fn per_thread(data: &mut [f32], width: usize) -> Vec<(Range<usize>, &mut [f32])> {
    let rows = data.len() / width;
    let threads = rayon::current_num_threads().max(1);
    let parts = (rows / min_share(width)).clamp(1, threads);
    let mut rest = data;
    let mut start = 0;
    (0..threads)
        .map(|i| {
            let end = rows * (i + 1).min(parts) / parts;
            let (share, tail) = std::mem::take(&mut rest).split_at_mut((end - start) * width);
            rest = tail;
            let range = start..end;
            start = end;
            (range, share)
        })
        .collect()
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, b] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (rows, n_in) = l1.shape().dims2()?;
        let (w_in, n_out) = match (self.0, l2.shape().dims2()?) {
            (WeightLayout::InOut, (i, o)) | (WeightLayout::OutIn, (o, i)) => (i, o),
        };
        if w_in != n_in || b.len() != n_out {
            candle_core::bail!(
                "{}: ({rows}, {n_in}) @ ({w_in}, {n_out}) + ({})",
                self.name(),
                b.len()
            );
        }
        let mut y = vec![0.0f32; rows * n_out];
        forward(x, (w, self.0), b, None, &mut y, None);
        Ok(output(y, (rows, n_out)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LinearBackward(self.0))?;
        unpack3(&packed, [x, w, b])
    }
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "fused-linear-backward"
    }

    /// Inputs x, weight, dy; output `[dx | dweight | dbias]` flattened.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, dy] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let n_out = match (self.0, l2.shape().dims2()?) {
            (WeightLayout::InOut, (_, o)) | (WeightLayout::OutIn, (o, _)) => o,
        };
        Ok(packed3((x.len(), w.len(), n_out), |dx, dw, db| {
            backward(x, (w, self.0), dy, (dx, None), dw, db)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Forward and backward in a pool of `threads`: `(y, dx, dw, db)`, the weight
    /// stored (in, out).
    fn run(threads: usize, (rows, n_in, n_out): (usize, usize, usize)) -> [Vec<f32>; 4] {
        let (x, w, b) = (
            values(rows * n_in, 1),
            values(n_in * n_out, 2),
            values(n_out, 3),
        );
        let (base, dy) = (values(rows * n_out, 4), values(rows * n_out, 5));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; rows * n_out];
            forward(&x, (&w, WeightLayout::InOut), &b, Some(&base), &mut y, None);
            let (mut dx, mut dw, mut db) = (
                vec![0.0; rows * n_in],
                vec![0.5; n_in * n_out],
                vec![0.5; n_out],
            );
            backward(
                &x,
                (&w, WeightLayout::InOut),
                &dy,
                (&mut dx, None),
                &mut dw,
                &mut db,
            );
            // The same weight stored (out, in) gives the same bits, dw transposed.
            let transpose = |m: &[f32], (r, c): (usize, usize)| -> Vec<f32> {
                (0..c * r).map(|k| m[(k % r) * c + k / r]).collect()
            };
            let wt = transpose(&w, (n_in, n_out));
            let mut y_t = vec![0.0; rows * n_out];
            forward(
                &x,
                (&wt, WeightLayout::OutIn),
                &b,
                Some(&base),
                &mut y_t,
                None,
            );
            let (mut dx_t, mut dw_t, mut db_t) = (
                vec![0.0; rows * n_in],
                vec![0.5; n_in * n_out],
                vec![0.5; n_out],
            );
            let wt = (&wt[..], WeightLayout::OutIn);
            backward(&x, wt, &dy, (&mut dx_t, None), &mut dw_t, &mut db_t);
            assert_eq!((&y_t, &dx_t, &db_t), (&y, &dx, &db), "(out, in) layout");
            assert_eq!(
                transpose(&dw_t, (n_out, n_in)),
                dw,
                "(out, in) weight gradient"
            );
            [y, dx, dw, db]
        })
    }

    #[test]
    fn matches_float64_and_does_not_depend_on_the_thread_count() {
        // 600 rows: dw's inner dimension is long enough for `gemm` to block it
        // differently in products of ≤ 64 × ≤ 64 (what too small a share would be).
        // dw 131 × 7 splits at 65 rows; 100 × 70 (wider than 64) into shares as thin
        // as 8 rows (64 threads).
        for (n_in, n_out) in [(131, 7), (100, 70)] {
            matches_float64_and_thread_counts_agree((600, n_in, n_out));
        }
    }

    /// Whether an f32 result is within 1e-6 of the magnitudes of its terms (`first`
    /// and the rest) from their float64 sum.
    fn close(got: f32, first: f64, terms: impl Iterator<Item = f64>) -> bool {
        let (sum, size) = terms.fold((first, first.abs()), |(s, a), t| (s + t, a + t.abs()));
        (got as f64 - sum).abs() <= 1e-6 * size
    }

    fn matches_float64_and_thread_counts_agree((rows, n_in, n_out): (usize, usize, usize)) {
        let (x, w, b) = (
            values(rows * n_in, 1),
            values(n_in * n_out, 2),
            values(n_out, 3),
        );
        let (base, dy) = (values(rows * n_out, 4), values(rows * n_out, 5));
        let f = |v: f32| v as f64;
        let [y, dx, dw, db] = run(1, (rows, n_in, n_out));
        for r in 0..rows {
            for o in 0..n_out {
                let terms = (0..n_in).map(|i| f(x[r * n_in + i]) * f(w[i * n_out + o]));
                let first = f(base[r * n_out + o]) + f(b[o]);
                assert!(close(y[r * n_out + o], first, terms), "y[{r},{o}]");
            }
            for i in 0..n_in {
                let terms = (0..n_out).map(|o| f(dy[r * n_out + o]) * f(w[i * n_out + o]));
                assert!(close(dx[r * n_in + i], 0.0, terms), "dx[{r},{i}]");
            }
        }
        for i in 0..n_in {
            for o in 0..n_out {
                let terms = (0..rows).map(|r| f(x[r * n_in + i]) * f(dy[r * n_out + o]));
                assert!(close(dw[i * n_out + o], 0.5, terms), "dw[{i},{o}]");
            }
        }
        for o in 0..n_out {
            let terms = (0..rows).map(|r| f(dy[r * n_out + o]));
            assert!(close(db[o], 0.5, terms), "db[{o}]");
        }
        // Shares of every size the thread counts give, the rest empty: every bit must
        // stay.
        for threads in [2, 3, 8, 64] {
            assert_eq!(
                run(threads, (rows, n_in, n_out)),
                [y.clone(), dx.clone(), dw.clone(), db.clone()],
                "{threads} threads"
            );
        }
    }
}
