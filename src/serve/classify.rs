//! `POST /v1/classify` for a sequence classifier: requests are queued to one thread
//! that owns the model and runs the inputs of every waiting request (up to
//! `max_batch`) through one padded forward pass, as the completions engine batches
//! its sequences.

use crate::classify::Classifier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// The inputs of one request, as the model takes them, and where its answer goes.
pub struct ClassifyJob {
    pub sequences: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f64>>, String>>,
}

/// Handle to the classification thread.
pub struct ClassifyEngine {
    jobs: mpsc::SyncSender<ClassifyJob>,
    /// Requests waiting or running.
    pub queued: Arc<AtomicUsize>,
    pub max_queue: usize,
    pub classifier: Arc<Classifier>,
}

impl ClassifyEngine {
    pub fn start(classifier: Classifier, max_batch: usize, max_queue: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel::<ClassifyJob>(max_queue.max(1));
        let classifier = Arc::new(classifier);
        let queued = Arc::new(AtomicUsize::new(0));
        let (model, count) = (Arc::clone(&classifier), Arc::clone(&queued));
        std::thread::Builder::new()
            .name("lmforge-classify".into())
            .spawn(move || run(&model, &rx, max_batch.max(1), &count))
            .expect("spawning the classification thread");
        ClassifyEngine {
            jobs: tx,
            queued,
            max_queue,
            classifier,
        }
    }

    /// Queues a job, or hands it back when the queue is full.
    pub fn submit(&self, job: ClassifyJob) -> Result<(), ClassifyJob> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(job);
        }
        self.jobs.send(job).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            e.0
        })
    }
}

fn run(
    classifier: &Classifier,
    rx: &mpsc::Receiver<ClassifyJob>,
    max_batch: usize,
    queued: &AtomicUsize,
) {
    while let Ok(first) = rx.recv() {
        // Every job waiting now joins the pass, up to max_batch inputs.
        let mut jobs = vec![first];
        let mut inputs = jobs[0].sequences.len();
        while inputs < max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    inputs += job.sequences.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let all: Vec<Vec<u32>> = jobs
            .iter()
            .flat_map(|j| j.sequences.iter().cloned())
            .collect();
        let result = classifier
            .probabilities(&all, max_batch)
            .map_err(|e| format!("{e:#}"));
        let mut start = 0;
        for job in jobs {
            let n = job.sequences.len();
            let answer = match &result {
                Ok(p) => Ok(p[start..start + n].to_vec()),
                Err(e) => Err(e.clone()),
            };
            start += n;
            queued.fetch_sub(1, Ordering::SeqCst);
            // A client that went away no longer waits for its answer.
            let _ = job.reply.send(answer);
        }
    }
}
