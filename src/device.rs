//! Where tensors live: `--device cpu|cuda[:N]` (and the `device` config key), opened
//! into a candle [`Device`] with a one-line error when it cannot be.

use anyhow::{bail, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let ordinal = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| anyhow::anyhow!("device {s:?}: expected cpu, cuda or cuda:N"))
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Ok(DeviceSpec::Cuda(ordinal(n)?)),
                None => bail!("device {s:?}: expected cpu, cuda or cuda:N"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

serde_as_string!(DeviceSpec);

impl DeviceSpec {
    /// The same spec with `local_rank` added to a CUDA ordinal: one GPU per process
    /// of a data-parallel job on one machine.
    pub fn for_local_rank(self, local_rank: usize) -> Self {
        match self {
            DeviceSpec::Cuda(n) => DeviceSpec::Cuda(n + local_rank),
            cpu => cpu,
        }
    }

    /// Opens the device. A CUDA device needs a `--features cuda` build and an NVIDIA
    /// driver; either missing is a one-line error, not a panic.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    // cudarc loads the driver on first use and panics when it is absent: look first.
    // SAFETY: only tries to dlopen libcuda, with no symbol resolved.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("device cuda:{ordinal}: no NVIDIA driver found (libcuda.so could not be loaded)");
    }
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("device cuda:{ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!("device cuda:{ordinal}: this lmforge was built without CUDA; build it with `--features cuda` (README, \"GPU\")")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_prints_them_back() {
        for (text, spec, shown) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:3", DeviceSpec::Cuda(3), "cuda:3"),
        ] {
            let parsed: DeviceSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(shown.parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(DeviceSpec::Cuda(1).for_local_rank(2), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cpu.for_local_rank(2), DeviceSpec::Cpu);
    }

    #[test]
    fn cpu_opens_and_a_missing_gpu_is_an_error_not_a_panic() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        // Without the feature, or on a machine without a driver (CI), cuda is refused
        // with one line; with a GPU present this opens it.
        match DeviceSpec::Cuda(0).open() {
            Ok(d) => assert!(d.is_cuda()),
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("device cuda:0: "), "{e}");
                assert!(!e.contains('\n'), "{e}");
            }
        }
    }
}
