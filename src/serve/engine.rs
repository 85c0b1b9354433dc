//! The decoding engine: one thread owns the model and runs a continuous batch.
//!
//! Each choice of each request is a sequence with its own KV cache and its own seeded
//! generator. Sequences join between steps (their prompt is prefilled alone), every
//! step decodes one token for all of them in a single batched pass
//! ([`Gpt::decode_step`]), and a sequence leaves as soon as it finishes, is cancelled,
//! or its client goes away — so its slot is free on the next step.

use crate::generate::{sample_next, SamplingOptions};
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
    Token(usize, u32),
    Done(usize, Finish),
    Failed(usize, String),
}

/// One sequence to decode.
pub struct Job {
    pub choice: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
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
                    if emit(&mut seq, next, stats) {
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

/// Runs a new sequence's prompt and samples its first token.
fn prefill(model: &Gpt, job: Job, stats: &EngineStats) -> Option<Sequence> {
    let first = (|| -> Result<(KvCache, Vec<f32>)> {
        let mut cache = KvCache::new(model.config.n_layer);
        let ids = Tensor::new(job.prompt.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&ids, Some(&mut cache), None)?;
        let last = logits
            .narrow(1, job.prompt.len() - 1, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((cache, last))
    })();
    match first {
        Ok((cache, logits)) => {
            let rng = ChaCha8Rng::seed_from_u64(job.seed);
            let mut seq = Sequence {
                job,
                cache,
                rng,
                last: 0,
                generated: 0,
            };
            let next = sample_next(&logits, &seq.job.sampling, &mut seq.rng);
            emit(&mut seq, next, stats).then_some(seq)
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(job.choice, format!("{e:#}")));
            None
        }
    }
}

/// Reports a sampled token; returns whether the sequence goes on.
fn emit(seq: &mut Sequence, token: u32, stats: &EngineStats) -> bool {
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
    if job.events.send(Event::Token(job.choice, token)).is_err() {
        return false;
    }
    if seq.generated >= job.max_tokens {
        let _ = job.events.send(Event::Done(job.choice, Finish::Length));
        return false;
    }
    true
}
