//! `POST /v1/classify` and `POST /v1/embeddings`: requests are queued to one thread that
//! owns the model and runs the inputs of every waiting request (up to `max_batch`)
//! through padded forward passes, as the completions engine batches its sequences.

use super::api::ApiError;
use axum::http::StatusCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

type Answer<T> = Result<Vec<T>, String>;

/// What the thread does: one answer per sequence, given the most to batch.
type Work<T> = dyn Fn(&[Vec<u32>], usize) -> anyhow::Result<Vec<T>>;

/// The inputs of one request, as the model takes them, and where its answer goes.
struct Job<T> {
    sequences: Vec<Vec<u32>>,
    reply: oneshot::Sender<Answer<T>>,
}

/// Handle to a batching thread whose work turns sequences into one `T` each.
pub struct BatchEngine<T> {
    jobs: mpsc::SyncSender<Job<T>>,
    /// Requests waiting or running.
    pub queued: Arc<AtomicUsize>,
    pub max_queue: usize,
}

impl<T: Clone + Send + 'static> BatchEngine<T> {
    /// Starts the thread; `work(sequences, max_batch)` answers every sequence in order.
    pub fn start(
        name: &str,
        max_batch: usize,
        max_queue: usize,
        work: impl Fn(&[Vec<u32>], usize) -> anyhow::Result<Vec<T>> + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Job<T>>(max_queue.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&queued);
        std::thread::Builder::new()
            .name(format!("lmforge-{name}"))
            .spawn(move || run(&work, &rx, max_batch.max(1), &count))
            .expect("spawning a batching thread");
        BatchEngine {
            jobs: tx,
            queued,
            max_queue,
        }
    }

    /// Queues the sequences and waits for their answers: 429 when the queue is full.
    pub async fn answer(&self, sequences: Vec<Vec<u32>>) -> Result<Vec<T>, ApiError> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(super::queue_full());
        }
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job { sequences, reply }).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        let server_error =
            |m: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m, "server_error");
        answer
            .await
            .map_err(|_| server_error("the batching thread stopped".into()))?
            .map_err(server_error)
    }
}

fn run<T: Clone>(
    work: &Work<T>,
    rx: &mpsc::Receiver<Job<T>>,
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
        let result = work(&all, max_batch).map_err(|e| format!("{e:#}"));
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
