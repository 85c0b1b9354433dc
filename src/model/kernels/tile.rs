//! A register-tiled matrix product for attention's per-head matrices.
//!
//! Attention multiplies many small matrices per head (`T × d` by `d × T` and back,
//! with causal extents that change every few rows). `gemm` packs both operands on
//! every call, and at these sizes packing and dispatch cost about as much as the
//! arithmetic (attention ran at 40 GFLOP/s per core against ~93 for the model's
//! large products). This product packs nothing: each output tile of [`MR`] rows ×
//! [`NR`] columns is held in registers (12 AVX2 vectors) while the inner dimension
//! runs, the left operand is read element by element at any strides (so `Aᵀ` is
//! free) and the right one a row of `NR` at a time, in place.
//!
//! Each output element is one chain of fused multiply-adds in the order of the inner
//! dimension, starting from zero or from the value already there: the result does
//! not depend on tiling, threads or the CPU's vector width.

/// Rows of an output tile.
pub const MR: usize = 6;
/// Columns of an output tile (two AVX2 vectors).
const NR: usize = 16;

/// `c (m × n) = a (m × k) · b (k × n)`. `c` is row-major with row stride `c_rs`;
/// `a` is read at `a[i·a_rs + p·a_cs]` (any strides, so a transpose is free) and `b`
/// at `b[p·b_rs + j]` (rows contiguous).
#[inline(always)]
pub fn product(
    (m, n, k): (usize, usize, usize),
    (c, c_rs): (&mut [f32], usize),
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs): (&[f32], usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c_rs >= n && c.len() > (m - 1) * c_rs + n - 1,
        "tile: c too short"
    );
    if k == 0 {
        c.chunks_mut(c_rs)
            .take(m)
            .for_each(|row| row[..n].fill(0.0));
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "tile: a too short"
    );
    assert!(b.len() > (k - 1) * b_rs + n - 1, "tile: b too short");
    let tiles = tiles_for_this_cpu();
    let mut padded = Vec::new();
    for j0 in (0..n).step_by(NR) {
        let cols = NR.min(n - j0);
        // A full-width read of `b` past its end (a last, narrow column tile) goes
        // through a zero-padded copy of the tile's columns instead.
        let (bt, bt_rs) = if b.len() >= (k - 1) * b_rs + j0 + NR {
            (&b[j0..], b_rs)
        } else {
            padded.clear();
            padded.resize(k * NR, 0.0);
            for (p, row) in padded.chunks_exact_mut(NR).enumerate() {
                row[..cols].copy_from_slice(&b[p * b_rs + j0..p * b_rs + j0 + cols]);
            }
            (&padded[..], NR)
        };
        let at = |i0: usize| &a[i0 * a_rs..];
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            let args = (k, (at(i0), a_rs, a_cs), (bt, bt_rs), cols);
            let ct = &mut c[i0 * c_rs + j0..];
            // SAFETY: the asserts above (and the padded copy) keep every index each
            // tile forms inside `a`, `bt` and `ct`: rows < `rows`, p < k, and
            // columns < `cols` for `c`, < NR for `bt`. The AVX2 tiles are chosen
            // only where the CPU has AVX2 and FMA.
            unsafe { tiles[rows - 1](args, (ct, c_rs)) }
        }
    }
}

/// The tile of each height 1..=[`MR`], `[rows - 1]`.
type Tiles = [unsafe fn(TileArgs, (&mut [f32], usize)); MR];

/// The AVX2 and FMA tiles where the CPU has them, else the plain ones.
fn tiles_for_this_cpu() -> Tiles {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        return [
            avx2::tile::<1>,
            avx2::tile::<2>,
            avx2::tile::<3>,
            avx2::tile::<4>,
            avx2::tile::<5>,
            avx2::tile::<6>,
        ];
    }
    [
        plain_tile::<1>,
        plain_tile::<2>,
        plain_tile::<3>,
        plain_tile::<4>,
        plain_tile::<5>,
        plain_tile::<6>,
    ]
}

/// A tile's inputs: inner length, `a` at its first row, `b` at its first column,
/// and the columns of `c` to store.
type TileArgs<'a> = (usize, (&'a [f32], usize, usize), (&'a [f32], usize), usize);

/// One `R × NR` output tile (of which `cols` columns are stored), in plain code.
#[inline(always)]
unsafe fn plain_tile<const R: usize>(
    (k, (a, a_rs, a_cs), (b, b_rs), cols): TileArgs,
    (c, c_rs): (&mut [f32], usize),
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let mut acc = [[0.0f32; NR]; R];
    for p in 0..k {
        let row = &*(b.add(p * b_rs) as *const [f32; NR]);
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = *a.add(r * a_rs + p * a_cs);
            for j in 0..NR {
                acc[j] = x.mul_add(row[j], acc[j]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let out = std::slice::from_raw_parts_mut(c.add(r * c_rs), cols);
        out.copy_from_slice(&acc[..cols]);
    }
}

/// The same tile with the accumulators held in AVX2 registers (two per row).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{TileArgs, NR};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize>(
        (k, (a, a_rs, a_cs), (b, b_rs), cols): TileArgs,
        (c, c_rs): (&mut [f32], usize),
    ) {
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // A narrow tile is stored through a full-width copy of its rows.
        let mut edge = [[0.0f32; NR]; R];
        for p in 0..k {
            let row = b.add(p * b_rs);
            let (b0, b1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * a_rs + p * a_cs));
                *acc = [
                    _mm256_fmadd_ps(x, b0, acc[0]),
                    _mm256_fmadd_ps(x, b1, acc[1]),
                ];
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = c.add(r * c_rs);
            let out = if cols == NR {
                row
            } else {
                edge[r].as_mut_ptr()
            };
            _mm256_storeu_ps(out, acc[0]);
            _mm256_storeu_ps(out.add(8), acc[1]);
            if cols < NR {
                std::ptr::copy_nonoverlapping(edge[r].as_ptr(), row, cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_float64_at_every_edge_and_stride() {
        let value = |i: usize| ((i * 7919 % 1009) as f32 / 504.5 - 1.0) * 0.75;
        for (m, n, k) in [(1, 1, 1), (6, 16, 64), (7, 17, 5), (13, 40, 33), (5, 3, 0)] {
            for transposed in [false, true] {
                // a stored k × m when transposed (read through strides), else m × k.
                let (a_rs, a_cs) = if transposed { (1, m + 2) } else { (k + 3, 1) };
                let a: Vec<f32> = (0..m.max(k + 2) * (m + k + 3)).map(value).collect();
                let b_rs = n + 1;
                let b: Vec<f32> = (0..k * b_rs).map(|i| value(i + 11)).collect();
                let c_rs = n + 2;
                let mut c: Vec<f32> = (0..m * c_rs).map(|i| value(i + 5)).collect();
                let before = c.clone();
                product((m, n, k), (&mut c, c_rs), (&a, a_rs, a_cs), (&b, b_rs));
                for i in 0..m {
                    for j in 0..c_rs {
                        let got = c[i * c_rs + j];
                        if j >= n {
                            assert_eq!(got, before[i * c_rs + j], "wrote past column {n}");
                            continue;
                        }
                        let want = (0..k).fold(0.0, |s, p| {
                            s + a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j] as f64
                        });
                        assert!(
                            (got as f64 - want).abs() < 1e-5,
                            "{m}×{n}×{k} t{transposed} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_tiles_equal_the_plain_ones_bit_for_bit() {
        if !super::super::has_avx2_fma() {
            return;
        }
        let value = |i: usize| (i * 7919 % 1009) as f32 / 504.5 - 1.0;
        let (a, b): (Vec<f32>, Vec<f32>) = (
            (0..400).map(value).collect(),
            (0..900).map(|i| value(i + 3)).collect(),
        );
        for (k, cols) in [(37, 16), (37, 7), (0, 16)] {
            let args = (k, (&a[..], 9, 1), (&b[..], 20), cols);
            let start: Vec<f32> = (0..6 * 18).map(|i| value(i + 7)).collect();
            let (mut plain, mut wide) = (start.clone(), start.clone());
            // SAFETY: a holds 6 rows of 9 × 37 + …, b 37 rows of 20, c 6 rows of 18.
            unsafe {
                plain_tile::<6>(args, (&mut plain, 18));
                avx2::tile::<6>(args, (&mut wide, 18));
                plain_tile::<3>(args, (&mut plain[..], 18));
                avx2::tile::<3>(args, (&mut wide[..], 18));
            }
            assert_eq!(plain, wide, "k {k}, {cols} columns");
            // Only the stored columns change; an empty product stores zeros.
            for (row, start) in plain.chunks(18).zip(start.chunks(18)) {
                assert_eq!(row[cols..], start[cols..], "k {k}, {cols} columns");
                assert_eq!(row[..cols].iter().all(|&x| x == 0.0), k == 0, "k {k}");
            }
        }
    }
}
