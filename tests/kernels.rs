//! The fused kernels (fast path) against the composed tensor ops (reference path):
//! forward values and every gradient, op by op and through the whole model.

use candle_core::{Device, Tensor, Var, D};
use lmforge::model::{backprop, cross_entropy_sum, kernels, Gpt, GptConfig, Kernels};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the largest |b| (so near-zero elements are not amplified).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Runs `f` on fresh variables, backpropagates Σ out·w for fixed random weights w,
/// and returns the output with the gradient of every input.
fn value_and_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors);
    let weights = random(out.dims(), 1.0, 99);
    let grads = (&out * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = tensors
        .iter()
        .map(|t| grads.get(t).expect("an input got no gradient").clone())
        .collect();
    (out, g)
}

fn assert_close(
    what: &str,
    fused: &(Tensor, Vec<Tensor>),
    composed: &(Tensor, Vec<Tensor>),
    tol: f32,
) {
    let d = rel_diff(&fused.0, &composed.0);
    assert!(d < tol, "{what}: forward differs by {d}");
    for (i, (a, b)) in fused.1.iter().zip(&composed.1).enumerate() {
        let d = rel_diff(a, b);
        assert!(d < tol, "{what}: gradient of input {i} differs by {d}");
    }
}

#[test]
fn layer_norm_matches_composed() {
    // Rows with an offset and unequal scales, as residual streams have.
    let x = (random(&[3, 5, 48], 2.0, 1) + 0.7).unwrap();
    let inputs = [x, random(&[48], 1.5, 2), random(&[48], 0.5, 3)];
    let fused = value_and_grads(&inputs, |t| {
        kernels::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()
    });
    let composed = value_and_grads(&inputs, |t| {
        let mean = t[0].mean_keepdim(D::Minus1).unwrap();
        let centred = t[0].broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        normed
            .broadcast_mul(&t[1])
            .unwrap()
            .broadcast_add(&t[2])
            .unwrap()
    });
    assert_close("layer norm", &fused, &composed, 2e-6);
}

#[test]
fn gelu_matches_candles_tanh_gelu() {
    let inputs = [random(&[7, 300], 6.0, 4)];
    let fused = value_and_grads(&inputs, |t| {
        kernels::gelu(&t[0], kernels::GeluForm::Tanh).unwrap()
    });
    let composed = value_and_grads(&inputs, |t| t[0].gelu().unwrap());
    assert_close("gelu", &fused, &composed, 2e-6);
}

#[test]
fn erf_gelu_matches_candles_erf_gelu() {
    let inputs = [random(&[7, 300], 6.0, 4)];
    let fused = value_and_grads(&inputs, |t| {
        kernels::gelu(&t[0], kernels::GeluForm::Erf).unwrap()
    });
    let composed = value_and_grads(&inputs, |t| t[0].gelu_erf().unwrap());
    assert_close("erf gelu", &fused, &composed, 2e-6);
}

#[test]
fn cross_entropy_matches_composed() {
    let logits = random(&[40, 65], 8.0, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let targets: Vec<u32> = (0..40).map(|_| rng.random_range(0..65)).collect();
    let targets = Tensor::from_vec(targets, 40, &Device::Cpu).unwrap();
    let loss = |k: Kernels| {
        value_and_grads(std::slice::from_ref(&logits), |t| {
            cross_entropy_sum(&t[0], &targets, k).unwrap()
        })
    };
    assert_close(
        "cross-entropy",
        &loss(Kernels::Fused),
        &loss(Kernels::Composed),
        2e-6,
    );
}

#[test]
fn cross_entropy_refuses_out_of_range_targets() {
    let logits = random(&[2, 5], 1.0, 7);
    let targets = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
    let err = cross_entropy_sum(&logits, &targets, Kernels::Fused).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

/// Logits and every parameter's gradient of the whole model under each kernel set:
/// this covers the fused attention (against split heads + mask + softmax + matmuls).
fn model_pass(m: &Gpt, x: &Tensor, y: &Tensor) -> (Tensor, Vec<Tensor>) {
    let (b, t) = x.dims2().unwrap();
    let logits = m.forward(x, None, None).unwrap();
    let flat = logits.reshape((b * t, m.config.vocab_size)).unwrap();
    let loss = (cross_entropy_sum(&flat, y, m.kernels).unwrap() / (b * t) as f64).unwrap();
    let grads = loss.backward().unwrap();
    let g = m
        .params()
        .iter()
        .map(|p| {
            grads
                .get(p.tensor())
                .unwrap_or_else(|| panic!("{}", p.name))
                .clone()
        })
        .collect();
    (logits, g)
}

#[test]
fn whole_model_fused_matches_composed() {
    // Sequences that do and do not fill the attention's last 6-row tile; heads 8, 16
    // and 40 wide (40: two 16-column tiles and a narrow one).
    for (n_embd, n_head, t) in [(24, 3, 13), (32, 2, 64), (80, 2, 77)] {
        let cfg = GptConfig {
            vocab_size: 29,
            n_positions: t,
            n_embd,
            n_layer: 2,
            n_head,
            layer_norm_epsilon: 1e-5,
            bias: true,
            dropout: 0.0,
            labels: Vec::new(),
            pad_token_id: None,
        };
        let mut m = Gpt::init(&cfg, 11, &Device::Cpu).unwrap();
        // Weights well away from GPT-2's small init, so attention is far from uniform.
        for p in m.params() {
            let noise = random(p.tensor().dims(), 0.4, 12);
            p.var.set(&(p.tensor() + noise).unwrap()).unwrap();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let ids: Vec<u32> = (0..3 * (t + 1)).map(|_| rng.random_range(0..29)).collect();
        let x = Tensor::from_vec(ids[..3 * t].to_vec(), (3, t), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(ids[3..].to_vec(), 3 * t, &Device::Cpu).unwrap();
        m.kernels = Kernels::Fused;
        let fused = model_pass(&m, &x, &y);
        m.kernels = Kernels::Composed;
        let composed = model_pass(&m, &x, &y);
        assert_close(
            &format!("model {n_embd}/{n_head}/{t}"),
            &fused,
            &composed,
            1e-5,
        );
    }
}

/// The hand-written step (`backprop`, the trainer's fast path) against autograd over
/// the composed reference ops: loss and every parameter gradient, with and without
/// biases, at lengths that do and do not fill the attention's tiles; gradients
/// accumulate across calls.
#[test]
fn hand_written_step_matches_autograd() {
    for (n_embd, n_head, t, bias) in [(24, 3, 13, true), (32, 2, 64, false), (16, 2, 77, true)] {
        let cfg = GptConfig {
            vocab_size: 29,
            n_positions: t + 3,
            n_embd,
            n_layer: 2,
            n_head,
            layer_norm_epsilon: 1e-5,
            bias,
            dropout: 0.0,
            labels: Vec::new(),
            pad_token_id: None,
        };
        let mut m = Gpt::init(&cfg, 11, &Device::Cpu).unwrap();
        for p in m.params().iter().filter(|p| p.trainable) {
            let noise = random(p.tensor().dims(), 0.4, 12);
            p.var.set(&(p.tensor() + noise).unwrap()).unwrap();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let ids: Vec<u32> = (0..3 * (t + 1)).map(|_| rng.random_range(0..29)).collect();
        let (inputs, targets) = (&ids[..3 * t], &ids[3..]);
        let x = Tensor::from_vec(inputs.to_vec(), (3, t), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(targets.to_vec(), 3 * t, &Device::Cpu).unwrap();
        m.kernels = Kernels::Composed;
        let (logits, reference) = model_pass(&m, &x, &y);
        let flat = logits.reshape((3 * t, 29)).unwrap();
        let want = cross_entropy_sum(&flat, &y, Kernels::Composed)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        m.kernels = Kernels::Fused;
        let params = m.params();
        let mut grads: Vec<Vec<f32>> = params
            .iter()
            .map(|p| vec![0.0; p.tensor().elem_count()])
            .collect();
        let scale = 1.0 / (3 * t) as f32;
        let what = format!("model {n_embd}/{n_head}/{t} bias={bias}");
        for calls in 1..=2 {
            let got = backprop::loss_and_grads(&m, inputs, targets, 3, Some((&mut grads, scale)))
                .unwrap();
            assert!(
                (got - want).abs() / want < 1e-5,
                "{what}: loss {got} vs {want}"
            );
            for ((p, g), r) in params.iter().zip(&grads).zip(&reference) {
                let r = (r * calls as f64).unwrap();
                let g = Tensor::from_vec(g.clone(), r.dims(), &Device::Cpu).unwrap();
                if p.trainable {
                    let d = rel_diff(&g, &r);
                    assert!(
                        d < 1e-5,
                        "{what}: {} after {calls} calls differs by {d}",
                        p.name
                    );
                } else {
                    assert!(
                        g.abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                            == 0.0
                    );
                }
            }
        }
        let scored = m.score(inputs, targets, 3).unwrap();
        assert!(
            (scored - want).abs() / want < 1e-5,
            "{what}: score {scored} vs {want}"
        );
    }
}

#[test]
fn hand_written_step_refuses_bad_ids() {
    let cfg = GptConfig {
        vocab_size: 10,
        n_positions: 8,
        n_embd: 8,
        n_layer: 1,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        bias: true,
        dropout: 0.0,
        labels: Vec::new(),
        pad_token_id: None,
    };
    let m = Gpt::init(&cfg, 1, &Device::Cpu).unwrap();
    let err = backprop::loss_and_grads(&m, &[1, 2, 10, 3], &[1, 2, 3, 4], 1, None).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = backprop::loss_and_grads(&m, &[1; 9], &[1; 9], 1, None).unwrap_err();
    assert!(err.to_string().contains("exceeds the context"), "{err}");
    let err = backprop::loss_and_grads(&m, &[1, 2], &[1, 12], 1, None).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn bidirectional_attention_with_key_padding_matches_composed() {
    use lmforge::model::layers::{attend, split_heads};
    let (b, t, h, c) = (3, 21, 2, 16);
    let lengths = vec![21, 14, 1];
    let inputs = [random(&[b, t, 3 * c], 2.0, 21)];
    let mask = kernels::AttentionMask::KeyLengths(lengths.clone());
    let fused = value_and_grads(&inputs, |x| {
        kernels::attention(&x[0], h, mask.clone()).unwrap()
    });
    let additive: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..t).map(move |j| if j < n { 0.0 } else { f32::MIN }))
        .collect();
    let additive = Tensor::from_vec(additive, (b, 1, 1, t), &Device::Cpu).unwrap();
    let composed = value_and_grads(&inputs, |x| {
        let part = |i: usize| split_heads(&x[0].narrow(2, i * c, c).unwrap(), h).unwrap();
        attend(&part(0), &part(1), &part(2), Some(&additive), None).unwrap()
    });
    assert_close("bidirectional attention", &fused, &composed, 2e-5);
    // Padding keys get exactly zero gradient.
    let g = fused.1[0].to_vec3::<f32>().unwrap();
    assert!(g[1][14..]
        .iter()
        .all(|row| row[c..].iter().all(|&x| x == 0.0)));
}

/// A small BERT or DistilBERT with weights well away from the init, a padded batch
/// (rows of 19, 11 and 5 real tokens) and labels at every third real position.
fn bert_case(
    flavor: lmforge::model::BertFlavor,
    kernels: Kernels,
) -> (lmforge::model::Bert, Tensor, Tensor, Vec<u32>, Vec<usize>) {
    use lmforge::model::bert::{BertConfig, IGNORE};
    let cfg = BertConfig {
        flavor,
        vocab_size: 50,
        max_position_embeddings: 24,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        type_vocab_size: if flavor == lmforge::model::BertFlavor::Bert {
            2
        } else {
            0
        },
        layer_norm_eps: 1e-12,
        dropout: 0.0,
        pad_token_id: 0,
        labels: Vec::new(),
    };
    let mut model = lmforge::model::Bert::init(&cfg, 5, &Device::Cpu).unwrap();
    for p in model.params() {
        let noise = random(p.tensor().dims(), 0.3, 12);
        p.var.set(&(p.tensor() + noise).unwrap()).unwrap();
    }
    model.kernels = kernels;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, t, lengths) = (3, 19, vec![19, 11, 5]);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(1..50)).collect();
    let mask: Vec<u32> = (0..b * t)
        .map(|i| (i % t < lengths[i / t]) as u32)
        .collect();
    let labels: Vec<u32> = (0..b * t)
        .map(|i| {
            if mask[i] == 1 && i % 3 == 0 {
                ids[i]
            } else {
                IGNORE
            }
        })
        .collect();
    let x = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let m = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    (model, x, m, labels, lengths)
}

/// The autograd loss and every parameter's gradient.
fn bert_autograd(
    model: &lmforge::model::Bert,
    x: &Tensor,
    m: &Tensor,
    labels: &[u32],
) -> (Tensor, Vec<Tensor>) {
    let (loss, _) = model
        .masked_lm_loss_sum(x, None, Some(m), labels, None)
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = model
        .params()
        .iter()
        .map(|p| grads.get(p.tensor()).unwrap().clone())
        .collect();
    (loss, g)
}

/// Gradients equal to `tol` relative to their scale, except the key bias's (zero in
/// exact arithmetic), which must be at roundoff on both sides.
fn assert_bert_grads_close(what: &str, got: &[Tensor], want: &[Tensor], tol: f32) {
    let largest = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        if largest(b) < 1e-5 {
            assert!(largest(a) < 1e-5, "{what}: parameter {i}");
            continue;
        }
        let d = rel_diff(a, b);
        assert!(d < tol, "{what}: gradient of parameter {i} differs by {d}");
    }
}

#[test]
fn bert_fused_matches_composed_with_padding() {
    use lmforge::model::BertFlavor;
    for flavor in [BertFlavor::Bert, BertFlavor::DistilBert] {
        let (model, x, m, labels, _) = bert_case(flavor, Kernels::Fused);
        let fused = bert_autograd(&model, &x, &m, &labels);
        let (model, x, m, labels, _) = bert_case(flavor, Kernels::Composed);
        let composed = bert_autograd(&model, &x, &m, &labels);
        assert!(rel_diff(&fused.0, &composed.0) < 1e-6, "{flavor:?} loss");
        assert_bert_grads_close(&format!("{flavor:?}"), &fused.1, &composed.1, 1e-4);
    }
}

#[test]
fn hand_written_bert_step_matches_autograd() {
    use lmforge::model::{bert_backprop, BertFlavor};
    for flavor in [BertFlavor::Bert, BertFlavor::DistilBert] {
        let (model, x, m, labels, lengths) = bert_case(flavor, Kernels::Fused);
        let (want, reference) = bert_autograd(&model, &x, &m, &labels);
        let want = want.to_scalar::<f32>().unwrap() as f64;
        let ids: Vec<u32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let params = model.params();
        let mut grads: Vec<Vec<f32>> = params
            .iter()
            .map(|p| vec![0.0; p.tensor().elem_count()])
            .collect();
        // Called twice: gradients add up, and buffers kept from the first call do not
        // leak into the second.
        for calls in 1..=2 {
            let (got, n) = bert_backprop::loss_and_grads(
                &model,
                &ids,
                &labels,
                &lengths,
                Some((&mut grads, 1.0)),
            )
            .unwrap();
            assert_eq!(n, labels.iter().filter(|&&l| l != u32::MAX).count());
            assert!(
                (got - want).abs() / want < 1e-5,
                "{flavor:?}: loss {got} vs {want}"
            );
            let got: Vec<Tensor> = params
                .iter()
                .zip(&grads)
                .map(|(p, g)| Tensor::from_slice(g, p.tensor().dims(), &Device::Cpu).unwrap())
                .collect();
            let want: Vec<Tensor> = reference
                .iter()
                .map(|r| (r * calls as f64).unwrap())
                .collect();
            assert_bert_grads_close(&format!("{flavor:?}, call {calls}"), &got, &want, 1e-4);
        }
        // Without gradients: the same loss.
        let (score, _) =
            bert_backprop::loss_and_grads(&model, &ids, &labels, &lengths, None).unwrap();
        assert!((score - want).abs() / want < 1e-5);
    }
}
