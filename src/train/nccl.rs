//! [`Collective`] over NCCL (feature `cuda`): one process per GPU, launched by
//! torchrun or mpirun ([`super::rendezvous`]). Tensors are reduced where they lie on
//! the GPU; the host-buffer calls (start-up checks, rare) go through the GPU too.
//! libnccl is opened at run time, like the rest of CUDA (ADR 014).

use super::distributed::Collective;
use super::rendezvous::Launch;
use anyhow::{anyhow, ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::rc::Rc;
use std::time::Duration;

pub struct NcclCollective {
    comm: Rc<Comm>,
    device: Device,
}

fn nccl(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("nccl: {e:?}")
}

impl NcclCollective {
    /// Joins the job this process was launched into, on GPU `first_gpu` + its local
    /// rank; `None` when no launcher started it.
    pub fn from_launcher(first_gpu: usize, timeout: Duration) -> Result<Option<Self>> {
        let Some(launch) = Launch::from_env()? else {
            return Ok(None);
        };
        let device = crate::device::DeviceSpec::Cuda(first_gpu)
            .for_local_rank(launch.local_rank)
            .open()?;
        let id = match launch.rank {
            0 => {
                let id = Id::new().map_err(nccl)?;
                let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
                launch.share(Some(&bytes), timeout)?;
                id
            }
            _ => {
                let bytes = launch.share(None, timeout)?;
                ensure!(
                    bytes.len() == 128,
                    "rank 0 sent an NCCL id of {} bytes",
                    bytes.len()
                );
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(&bytes) {
                    *d = *s as std::ffi::c_char;
                }
                Id::uninit(internal)
            }
        };
        let stream = device.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, launch.rank, launch.world_size, id).map_err(nccl)?;
        Ok(Some(NcclCollective {
            comm: Rc::new(comm),
            device,
        }))
    }

    fn to_gpu<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.comm.stream().clone_htod(host)?)
    }

    fn to_host<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        slice: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        Ok(self.comm.stream().clone_dtoh(slice)?)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut gpu = self.to_gpu(buf)?;
        self.comm
            .all_reduce_in_place(&mut gpu, &ReduceOp::Sum)
            .map_err(nccl)?;
        buf.copy_from_slice(&self.to_host(&gpu)?);
        Ok(())
    }

    fn reduce_scatter_sum(&self, buf: &[f32]) -> Result<Vec<f32>> {
        let send = self.to_gpu(buf)?;
        let mut recv = self
            .comm
            .stream()
            .alloc_zeros::<f32>(buf.len() / self.size())?;
        self.comm
            .reduce_scatter(&send, &mut recv, &ReduceOp::Sum)
            .map_err(nccl)?;
        self.to_host(&recv)
    }

    fn all_gather(&self, mine: &[f32]) -> Result<Vec<f32>> {
        let send = self.to_gpu(mine)?;
        let mut recv = self
            .comm
            .stream()
            .alloc_zeros::<f32>(mine.len() * self.size())?;
        self.comm.all_gather(&send, &mut recv).map_err(nccl)?;
        self.to_host(&recv)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut gpu = self.to_gpu(buf)?;
        self.comm
            .broadcast_in_place(&mut gpu, root as i32)
            .map_err(nccl)?;
        buf.copy_from_slice(&self.to_host(&gpu)?);
        Ok(())
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let send = self.to_gpu(&[value])?;
        let mut recv = self.comm.stream().alloc_zeros::<u64>(self.size())?;
        self.comm.all_gather(&send, &mut recv).map_err(nccl)?;
        self.to_host(&recv)
    }

    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        ensure!(
            t.device().same_device(&self.device),
            "a tensor on {:?}, the NCCL communicator's GPU is {:?}",
            t.device().location(),
            self.device.location()
        );
        Ok(t.contiguous()?
            .apply_op1_no_bwd(&AllReduce(Rc::clone(&self.comm)))?)
    }

    fn device(&self) -> Option<&Device> {
        Some(&self.device)
    }
}

/// An f32 all-reduce as a candle op, so the sum stays a tensor on the GPU.
struct AllReduce(Rc<Comm>);

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("nccl-all-reduce runs on a CUDA device")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let src = s.as_cuda_slice::<f32>()?;
        let src = match l.contiguous_offsets() {
            Some((start, end)) if end - start == n => src.slice(start..end),
            _ => candle_core::bail!("nccl-all-reduce: input must be contiguous"),
        };
        let device = s.device().clone();
        let mut dst = self
            .0
            .stream()
            .alloc_zeros::<f32>(n)
            .map_err(candle_core::Error::wrap)?;
        self.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("nccl: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), l.shape().clone()))
    }
}
