//! Collectives for data-parallel training: a small trait, the single-process
//! implementation (every call is the identity), and MPI's (feature `mpi`, launched by
//! `mpirun`/`srun`), and NCCL's for GPUs (feature `cuda`, [`super::nccl`]).
//!
//! Buffers are f32; `reduce_scatter_sum` and `all_gather` work on equal shards, so
//! callers pad to a multiple of `size()`. A tensor goes through the host unless the
//! implementation can reduce it where it lies (NCCL on the GPU).

use anyhow::Result;
use candle_core::Tensor;

pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Sums `buf` over ranks and returns this rank's shard (`buf.len() / size()`
    /// elements starting at `rank() * buf.len() / size()`).
    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>>;
    /// Every rank's equal-length `mine`, concatenated in rank order.
    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>>;
    /// Replaces `buf` on every rank with `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Every rank's value, in rank order (for start-up consistency checks).
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    fn barrier(&self) -> Result<()>;
    /// The GPU this rank's communicator is bound to (NCCL), where its model must live.
    fn device(&self) -> Option<&candle_core::Device> {
        None
    }
    /// Element-wise sum over ranks of a 1-D f32 tensor, returned on its device.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut host = t.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        Ok(Tensor::from_vec(host, t.shape(), t.device())?)
    }
}

/// One process: nothing to exchange.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>> {
        Ok(buf.to_vec())
    }
    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>> {
        Ok(mine.to_vec())
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_impl::MpiCollective;

#[cfg(feature = "mpi")]
mod mpi_impl {
    use super::Collective;
    use anyhow::{anyhow, Result};
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::topology::{Communicator, SimpleCommunicator};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// MPI's world communicator, with a watchdog: a collective that gets no answer
    /// within the timeout (a rank died or hangs) ends this process with a message
    /// naming the rank and the operation, so no rank waits forever.
    pub struct MpiCollective {
        _universe: mpi::environment::Universe,
        world: SimpleCommunicator,
        waiting: Arc<Mutex<Option<(&'static str, Instant)>>>,
    }

    impl MpiCollective {
        /// Joins the MPI job; `None` when not launched by an MPI launcher.
        pub fn from_launcher(timeout: Duration) -> Result<Option<Self>> {
            let launched = [
                "OMPI_COMM_WORLD_SIZE",
                "PMI_SIZE",
                "PMIX_RANK",
                "MPI_LOCALNRANKS",
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
            if !launched {
                return Ok(None);
            }
            let universe =
                mpi::initialize().ok_or_else(|| anyhow!("MPI was already initialised"))?;
            let world = universe.world();
            let rank = world.rank();
            let waiting: Arc<Mutex<Option<(&'static str, Instant)>>> = Arc::new(Mutex::new(None));
            let watched = Arc::clone(&waiting);
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let stuck = watched
                    .lock()
                    .ok()
                    .and_then(|w| *w)
                    .filter(|(_, since)| since.elapsed() > timeout);
                if let Some((op, since)) = stuck {
                    eprintln!(
                        "error: rank {rank}: {op} got no answer from the other ranks for {:.0} s (collective_timeout_s): a rank died or hangs; stopping",
                        since.elapsed().as_secs_f64()
                    );
                    std::process::exit(3);
                }
            });
            Ok(Some(MpiCollective {
                _universe: universe,
                world,
                waiting,
            }))
        }

        fn guarded<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
            *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some((op, Instant::now()));
            let out = f();
            *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = None;
            out
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.guarded("all-reduce", || {
                self.world
                    .all_reduce_into(&send[..], buf, SystemOperation::sum())
            });
            Ok(())
        }
        fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>> {
            let mut mine = vec![0.0f32; buf.len() / self.size()];
            self.guarded("reduce-scatter", || {
                self.world
                    .reduce_scatter_block_into(buf, &mut mine[..], SystemOperation::sum())
            });
            Ok(mine)
        }
        fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>> {
            let mut all = vec![0.0f32; mine.len() * self.size()];
            self.guarded("all-gather", || {
                self.world.all_gather_into(mine, &mut all[..])
            });
            Ok(all)
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
            use mpi::collective::Root;
            self.guarded("broadcast", || {
                self.world.process_at_rank(root as i32).broadcast_into(buf)
            });
            Ok(())
        }
        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            let mut all = vec![0u64; self.size()];
            self.guarded("all-gather", || {
                self.world.all_gather_into(&value, &mut all[..])
            });
            Ok(all)
        }
        fn barrier(&self) -> Result<()> {
            self.guarded("barrier", || self.world.barrier());
            Ok(())
        }
    }
}
