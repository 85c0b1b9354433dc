//! The model's autograd against central finite differences in f64, gradient
//! accumulation against one big batch, and KV-cached decoding against full recompute.

use candle_core::{DType, Device, Tensor};
use lmforge::data::Batch;
use lmforge::generate::{generate, SamplingOptions};
use lmforge::model::{Gpt, GptConfig, Model};
use lmforge::train::parallel::Gradients;
use lmforge::train::trainer::accumulate_gradients;
use rand::{Rng, SeedableRng};

fn tiny(vocab: usize, ctx: usize) -> GptConfig {
    GptConfig {
        vocab_size: vocab,
        n_positions: ctx,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        bias: true,
        dropout: 0.0,
        labels: Vec::new(),
        pad_token_id: None,
    }
}

fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn loss_f64(m: &Gpt, x: &Tensor, y: &Tensor) -> Tensor {
    let (b, t) = x.dims2().unwrap();
    (m.loss_sum(x, y, None).unwrap() / (b * t) as f64).unwrap()
}

#[test]
fn gradients_match_central_finite_differences_in_f64() {
    let cfg = tiny(11, 8);
    let m = Gpt::init(&cfg, 3, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    // Larger weights than GPT-2's init so every path carries a visible gradient.
    for p in m.params() {
        let t = p.tensor();
        let noise = Tensor::randn(0.0, 0.3, t.shape(), t.device())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        p.var.set(&(t + noise).unwrap()).unwrap();
    }
    let ids = random_ids(2 * 6, 11, 5);
    let x = Tensor::from_vec(ids[..10].to_vec(), (2, 5), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(ids[2..].to_vec(), 10, &Device::Cpu).unwrap();
    let grads = loss_f64(&m, &x, &y).backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    for p in m.params() {
        let analytic: Vec<f64> = grads
            .get(p.tensor())
            .expect(&p.name)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = p.tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for &k in &[0, n / 2, n - 1] {
            let at = |delta: f64| {
                let mut w = base.clone();
                w[k] += delta;
                p.var
                    .set(&Tensor::from_vec(w, p.tensor().shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_f64(&m, &x, &y).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            p.var
                .set(&Tensor::from_vec(base.clone(), p.tensor().shape(), &Device::Cpu).unwrap())
                .unwrap();
            let a = analytic[k];
            assert!(
                (numeric - a).abs() <= 1e-7 + 1e-5 * a.abs(),
                "{}[{k}]: analytic {a:e}, numeric {numeric:e}",
                p.name
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * m.params().len());
}

#[test]
fn accumulating_two_halves_equals_one_batch() {
    let cfg = tiny(13, 16);
    let m = Model::Gpt(Gpt::init(&cfg, 1, &Device::Cpu).unwrap());
    let (rows, t) = (12, 16);
    let ids = random_ids(rows * (t + 1), 13, 9);
    let batch = |r0: usize, r1: usize| {
        Batch::causal(
            (r0..r1)
                .flat_map(|r| ids[r * (t + 1)..r * (t + 1) + t].to_vec())
                .collect(),
            (r0..r1)
                .flat_map(|r| ids[r * (t + 1) + 1..(r + 1) * (t + 1)].to_vec())
                .collect(),
            r1 - r0,
            t,
            1,
        )
    };
    let zeros = || -> Vec<Vec<f32>> {
        m.params()
            .iter()
            .map(|p| vec![0.0; p.tensor().elem_count()])
            .collect()
    };
    let (mut whole, mut halves) = (Gradients::Host(zeros()), Gradients::Host(zeros()));
    let l1 = accumulate_gradients(&m, vec![batch(0, 12)], None, &mut whole, (None, 1.0)).unwrap();
    let l2 = accumulate_gradients(
        &m,
        vec![batch(0, 6), batch(6, 12)],
        None,
        &mut halves,
        (None, 1.0),
    )
    .unwrap();
    let (whole, halves) = (whole.into_host().unwrap(), halves.into_host().unwrap());
    assert!((l1 - l2).abs() < 1e-5, "{l1} vs {l2}");
    for ((p, a), b) in m.params().iter().zip(&whole).zip(&halves) {
        assert!(a.iter().any(|&g| g != 0.0), "{} got no gradient", p.name);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "{}: max difference {diff:e}", p.name);
    }
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let cfg = tiny(17, 12);
    let m = Gpt::init(&cfg, 4, &Device::Cpu).unwrap();
    let prompt = vec![1u32, 5, 9];
    // 20 new tokens run past the 12-token context, exercising the window rebuild.
    let opts = SamplingOptions {
        max_new_tokens: 20,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        greedy: true,
        stop_token: None,
    };
    let cached = generate(
        &m,
        &prompt,
        &opts,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap();

    let mut full = prompt.clone();
    for _ in 0..20 {
        let window = &full[full.len().saturating_sub(12)..];
        let x = Tensor::new(window, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward(&x, None, None).unwrap();
        let last: Vec<f32> = logits
            .narrow(1, window.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = last
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0;
        full.push(next as u32);
    }
    assert_eq!(cached, full);

    // And the logits themselves: one cached step equals the full forward's last row.
    let mut cache = lmforge::model::KvCache::new(cfg.n_layer);
    let x = Tensor::new(&[1u32, 5, 9, 2][..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&x.narrow(1, 0, 3).unwrap(), Some(&mut cache), None)
        .unwrap();
    let step: Vec<f32> = m
        .forward(&x.narrow(1, 3, 1).unwrap(), Some(&mut cache), None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let whole: Vec<f32> = m
        .forward(&x, None, None)
        .unwrap()
        .narrow(1, 3, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let diff = step
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "cached vs full logits differ by {diff:e}");
}

#[test]
fn same_seed_same_model_different_seed_different_model() {
    let cfg = tiny(11, 8);
    let a = Gpt::init(&cfg, 7, &Device::Cpu).unwrap();
    let b = Gpt::init(&cfg, 7, &Device::Cpu).unwrap();
    let c = Gpt::init(&cfg, 8, &Device::Cpu).unwrap();
    let flat = |m: &Gpt| -> Vec<f32> {
        m.params()
            .iter()
            .flat_map(|p| p.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    assert_eq!(flat(&a), flat(&b));
    assert_ne!(flat(&a), flat(&c));
}

#[test]
fn batched_decode_rows_equal_single_sequence_decoding() {
    let cfg = tiny(17, 16);
    let m = Gpt::init(&cfg, 5, &Device::Cpu).unwrap();
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4], &[5, 6, 7, 8, 9]];
    let next = [10u32, 11, 12];
    let prefilled = |p: &[u32]| {
        let mut cache = lmforge::model::KvCache::new(cfg.n_layer);
        let ids = Tensor::new(p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        m.forward(&ids, Some(&mut cache), None).unwrap();
        cache
    };
    // Alone: prefill, then one cached step each.
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .zip(next)
        .map(|(p, t)| {
            m.decode_step(&[t], &mut [&mut prefilled(p)])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    // Together: three caches of different lengths in one step.
    let mut caches: Vec<lmforge::model::KvCache> = prompts.iter().map(|p| prefilled(p)).collect();
    let mut refs: Vec<&mut lmforge::model::KvCache> = caches.iter_mut().collect();
    let together: Vec<Vec<f32>> = m.decode_step(&next, &mut refs).unwrap().to_vec2().unwrap();
    for (a, b) in alone.iter().zip(&together) {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "batched row differs by {diff:e}");
    }
    assert_eq!(
        caches.iter().map(|c| c.len()).collect::<Vec<_>>(),
        vec![4, 2, 6]
    );
}
