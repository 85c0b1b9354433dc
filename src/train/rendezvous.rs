//! How the processes of a GPU job find each other: who they are (torchrun's or
//! Open MPI's environment variables) and one exchange over TCP that hands every rank
//! rank 0's bytes (NCCL's unique id), as torchrun's `MASTER_ADDR:MASTER_PORT` store
//! does. Plain std networking, so it is tested without a GPU.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// This process's place in a job, from its launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// Index among the ranks on this machine: which GPU it takes.
    pub local_rank: usize,
    /// Where rank 0 listens: MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500).
    pub master: String,
}

impl Launch {
    /// From torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) or Open MPI's
    /// (OMPI_COMM_WORLD_RANK, …_SIZE, …_LOCAL_RANK); `None` when neither launched
    /// this process. `var` reads one variable (the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let sets = [
            ["RANK", "WORLD_SIZE"],
            ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"],
        ];
        let Some([rank, size]) = sets
            .iter()
            .find(|[r, s]| var(r).is_some() && var(s).is_some())
        else {
            return Ok(None);
        };
        let number = |key: &str| -> Result<usize> {
            let raw = var(key).unwrap_or_else(|| "0".into());
            raw.trim()
                .parse()
                .map_err(|_| anyhow!("{key}={raw:?}: expected a non-negative integer"))
        };
        let launch = Launch {
            rank: number(rank)?,
            world_size: number(size)?,
            local_rank: local_rank_in(&var),
            master: format!(
                "{}:{}",
                var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                var("MASTER_PORT").unwrap_or_else(|| "29500".into())
            ),
        };
        ensure!(
            launch.world_size > 0 && launch.rank < launch.world_size,
            "{rank}={} is not below {size}={}",
            launch.rank,
            launch.world_size
        );
        Ok(Some(launch))
    }

    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Rank 0 sends `root_bytes` to every other rank, which receives it; all get it
    /// back. Any rank not heard from within `timeout` is an error naming the address.
    pub fn share(&self, root_bytes: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
        let master = resolve(&self.master)?;
        if self.rank == 0 {
            let bytes = root_bytes.context("rank 0 must give the bytes to share")?;
            ensure!(bytes.len() <= u32::MAX as usize, "payload too large");
            let listener = TcpListener::bind(master).with_context(|| {
                format!("rank 0: cannot listen on {master} (MASTER_ADDR:MASTER_PORT)")
            })?;
            listener.set_nonblocking(true)?;
            let deadline = Instant::now() + timeout;
            let mut served = 0;
            while served + 1 < self.world_size {
                match listener.accept() {
                    Ok((mut peer, _)) => {
                        peer.set_nonblocking(false)?;
                        peer.write_all(&(bytes.len() as u32).to_le_bytes())?;
                        peer.write_all(bytes)?;
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            bail!(
                                "rank 0: only {served} of {} ranks connected to {master} within {timeout:?}",
                                self.world_size - 1
                            );
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(bytes.to_vec());
        }
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&master, Duration::from_secs(1)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => bail!(
                    "rank {}: no rank 0 at {master} within {timeout:?}: {e}",
                    self.rank
                ),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len)?;
        let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
        stream
            .read_exact(&mut bytes)
            .with_context(|| format!("rank {}: reading from rank 0 at {master}", self.rank))?;
        Ok(bytes)
    }
}

/// This process's index among the ranks on its machine, as the launcher says
/// (torchrun's LOCAL_RANK, Open MPI's, MPICH's or Slurm's), 0 when none does.
pub fn local_rank_in(var: &impl Fn(&str) -> Option<String>) -> usize {
    [
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|k| var(k)?.trim().parse().ok())
    .unwrap_or(0)
}

/// [`local_rank_in`] this process's environment.
pub fn local_rank() -> usize {
    local_rank_in(&|k| std::env::var(k).ok())
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| anyhow!("MASTER_ADDR:MASTER_PORT {addr:?}: not an address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_torchrun_and_open_mpi_variables() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        let torchrun = vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "1234"),
        ]);
        assert_eq!(
            Launch::from_vars(torchrun).unwrap(),
            Some(Launch {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                master: "10.0.0.2:1234".into()
            })
        );
        let mpi = vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]);
        let launch = Launch::from_vars(mpi).unwrap().unwrap();
        assert_eq!((launch.rank, launch.local_rank), (1, 1));
        assert_eq!(launch.master, "127.0.0.1:29500");
        assert_eq!(local_rank_in(&vars(&[("SLURM_LOCALID", "3")])), 3);
        assert_eq!(local_rank_in(&vars(&[])), 0);
        let e = Launch::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = Launch::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
    }

    /// Four ranks in threads: every one ends with rank 0's 128 bytes, whichever
    /// starts first.
    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let id: Vec<u8> = (0..128u32).map(|i| (i * 7 % 251) as u8).collect();
        let handles: Vec<_> = (0..4)
            .rev()
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let launch = Launch {
                        rank,
                        world_size: 4,
                        local_rank: rank,
                        master: format!("127.0.0.1:{port}"),
                    };
                    let mine = (rank == 0).then_some(id.as_slice());
                    launch.share(mine, Duration::from_secs(20)).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_zero_is_an_error_after_the_timeout() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let launch = Launch {
            rank: 1,
            world_size: 2,
            local_rank: 1,
            master: format!("127.0.0.1:{port}"),
        };
        let e = launch
            .share(None, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no rank 0 at 127.0.0.1:"), "{e}");
        let root = Launch { rank: 0, ..launch };
        let e = root
            .share(Some(b"id"), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 0 of 1 ranks connected"), "{e}");
    }
}
