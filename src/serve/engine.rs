//! The decoding engine: one thread owns the model and runs a continuous batch.
//!
//! Each choice of each request is a sequence with its own KV cache and its own seeded
//! generator. Sequences join between steps (their prompt is prefilled alone), every
//! step decodes one token for all of them in a single batched pass
//! ([`Gpt::decode_step`]), and a sequence leaves as soon as it finishes, is cancelled,
//! or its client goes away — so its slot is free on the next step.

use crate::generate::{sample_next, token_logprob, SamplingOptions, TokenLogprob};
use crate::model::{Gpt, KvCache};
use anyhow::Result;
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End-of-text, or a stop sequence (the caller cancels then).
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What a sequence reports back, tagged with its choice index.
#[derive(Debug, Clone)]
pub enum Event {
    /// A sampled token, with its log-probability when the job asked for them.
    Token(usize, u32, Option<TokenLogprob>),
    /// The log-probability of each prompt token after the first (`score_prompt`).
    Prompt(usize, Vec<TokenLogprob>),
    Done(usize, Finish),
    Failed(usize, String),
}

/// One sequence to decode.
pub struct Job {
    pub choice: usize,
    pub prompt: Vec<u32>,
    /// 0 with `score_prompt`: only score the prompt.
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    /// Report each token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report the prompt's own log-probabilities (OpenAI's echo with logprobs).
    pub score_prompt: bool,
    pub seed: u64,
    pub events: UnboundedSender<Event>,
    /// Set by the caller to end the sequence early (stop sequence found).
    pub cancel: Arc<AtomicBool>,
}

/// Counters the server exposes on /metrics.
#[derive(Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub tokens_generated: AtomicU64,
    pub steps: AtomicU64,
}

struct Sequence {
    job: Job,
    cache: KvCache,
    rng: ChaCha8Rng,
    last: u32,
    generated: usize,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::SyncSender<Job>,
    pub stats: Arc<EngineStats>,
    pub max_queue: usize,
}

impl Engine {
    /// Starts the engine thread; at most `max_batch` sequences decode together and at
    /// most `max_queue` wait for a place.
    pub fn start(model: Gpt, max_batch: usize, max_queue: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job>(max_queue.max(1));
        let stats = Arc::new(EngineStats::default());
        let thread_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("lmforge-engine".into())
            .spawn(move || run(model, rx, max_batch.max(1), &thread_stats))
            .expect("spawning the engine thread");
        Engine {
            jobs: tx,
            stats,
            max_queue,
        }
    }

    /// Queues jobs together, or returns them all if the queue cannot take them.
    pub fn submit(&self, jobs: Vec<Job>) -> std::result::Result<(), Vec<Job>> {
        let queued = self.stats.queued.fetch_add(jobs.len(), Ordering::SeqCst);
        if queued + jobs.len() > self.max_queue {
            self.stats.queued.fetch_sub(jobs.len(), Ordering::SeqCst);
            return Err(jobs);
        }
        for job in jobs {
            if self.jobs.send(job).is_err() {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

fn run(model: Gpt, rx: mpsc::Receiver<Job>, max_batch: usize, stats: &EngineStats) {
    let mut active: Vec<Sequence> = Vec::new();
    loop {
        // Admit waiting jobs; block only when there is nothing to decode.
        while active.len() < max_batch {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            stats.queued.fetch_sub(1, Ordering::SeqCst);
            if let Some(seq) = prefill(&model, job, stats) {
                active.push(seq);
            }
        }
        stats.active.store(active.len(), Ordering::SeqCst);
        if active.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = active.iter().map(|s| s.last).collect();
        let mut caches: Vec<&mut KvCache> = active.iter_mut().map(|s| &mut s.cache).collect();
        let logits = model
            .decode_step(&tokens, &mut caches)
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        stats.steps.fetch_add(1, Ordering::Relaxed);
        match logits {
            Ok(rows) => {
                let mut kept = Vec::with_capacity(active.len());
                for (mut seq, row) in active.drain(..).zip(rows) {
                    let next = sample_next(&row, &seq.job.sampling, &mut seq.rng);
                    if emit(&mut seq, next, &row, stats) {
                        kept.push(seq);
                    }
                }
                active = kept;
            }
            Err(e) => {
                for seq in active.drain(..) {
                    let _ = seq
                        .job
                        .events
                        .send(Event::Failed(seq.job.choice, format!("{e:#}")));
                }
            }
        }
        stats.active.store(active.len(), Ordering::SeqCst);
    }
}

/// Runs a new sequence's prompt (scoring it if asked) and samples its first token.
fn prefill(model: &Gpt, job: Job, stats: &EngineStats) -> Option<Sequence> {
    let first = (|| -> Result<(KvCache, Vec<f32>, Vec<TokenLogprob>)> {
        let mut cache = KvCache::new(model.config.n_layer);
        let ids = Tensor::new(job.prompt.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&ids, Some(&mut cache), None)?.squeeze(0)?;
        let n = job.prompt.len();
        // Each sequence's prompt runs alone, so its scores do not depend on what else
        // is being decoded.
        let mut scored = Vec::new();
        if job.score_prompt {
            for (i, &next) in job.prompt[1..].iter().enumerate() {
                let row = logits.get(i)?.to_vec1::<f32>()?;
                scored.push(token_logprob(&row, next, job.logprobs.unwrap_or(0)));
            }
        }
        let last = logits.get(n - 1)?.to_vec1::<f32>()?;
        Ok((cache, last, scored))
    })();
    match first {
        Ok((cache, logits, scored)) => {
            if job.score_prompt {
                let _ = job.events.send(Event::Prompt(job.choice, scored));
            }
            if job.max_tokens == 0 {
                let _ = job.events.send(Event::Done(job.choice, Finish::Length));
                return None;
            }
            let rng = ChaCha8Rng::seed_from_u64(job.seed);
            let mut seq = Sequence {
                job,
                cache,
                rng,
                last: 0,
                generated: 0,
            };
            let next = sample_next(&logits, &seq.job.sampling, &mut seq.rng);
            emit(&mut seq, next, &logits, stats).then_some(seq)
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(job.choice, format!("{e:#}")));
            None
        }
    }
}

/// Reports a sampled token (`logits`: the row it was drawn from); returns whether the
/// sequence goes on.
fn emit(seq: &mut Sequence, token: u32, logits: &[f32], stats: &EngineStats) -> bool {
    let job = &seq.job;
    if job.cancel.load(Ordering::SeqCst) {
        return false;
    }
    if Some(token) == job.sampling.stop_token {
        let _ = job.events.send(Event::Done(job.choice, Finish::Stop));
        return false;
    }
    seq.generated += 1;
    seq.last = token;
    stats.tokens_generated.fetch_add(1, Ordering::Relaxed);
    // A closed channel means the client went away: free the slot.
    let logprob = job.logprobs.map(|n| token_logprob(logits, token, n));
    if job
        .events
        .send(Event::Token(job.choice, token, logprob))
        .is_err()
    {
        return false;
    }
    if seq.generated >= job.max_tokens {
        let _ = job.events.send(Event::Done(job.choice, Finish::Length));
        return false;
    }
    true
}
