# Source this: `source scripts/cuda_env.sh`. NVIDIA's CUDA 13.0 compiler and headers
# from PyPI wheels, in a venv kept outside the repository (~/.cache/lmforge/cuda-venv),
# for building the `cuda` feature on a machine without the CUDA toolkit (ADR 014):
#   source scripts/cuda_env.sh && cargo build --release --features cuda
# compiles candle's CUDA kernels to PTX for CUDA_COMPUTE_CAP (default 90: H100/H200).
# Every wheel is pinned to 13.0: nvcc's front end (nvvm, crt) must match its ptxas, and
# PTX newer than the device's driver would not load there (the device has CUDA 13.0).
# The binary links only the CUDA runtime (libcudart.so.13, which candle's MoE kernels
# call; LD_LIBRARY_PATH below finds it here, torch's wheels on the device); the driver,
# cuBLAS, cuRAND, NVRTC and NCCL are opened when a GPU is first used (the vendored
# candle-core's `dynamic-loading`).

_lmforge_cuda_venv="${HOME}/.cache/lmforge/cuda-venv"
if [ ! -x "${_lmforge_cuda_venv}/bin/python" ] \
  || ! "${_lmforge_cuda_venv}/bin/python" -c "import nvidia" >/dev/null 2>&1; then
  python3 -m venv "${_lmforge_cuda_venv}" \
    && "${_lmforge_cuda_venv}/bin/pip" install -q \
      "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
      "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
_lmforge_cuda_root="$("${_lmforge_cuda_venv}/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
export CUDA_ROOT="${_lmforge_cuda_root}" CUDA_PATH="${_lmforge_cuda_root}" CUDA_HOME="${_lmforge_cuda_root}"
export PATH="${_lmforge_cuda_root}/bin:${PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
unset _lmforge_cuda_venv _lmforge_cuda_root
# `-lcudart` needs the unversioned name the wheel does not ship: a link directory for
# the linker (LIBRARY_PATH: not part of cargo's fingerprint, so no rebuild).
_lmforge_cuda_lib="${CUDA_ROOT}/lib"
_lmforge_cuda_link="${HOME}/.cache/lmforge/cuda-link"
mkdir -p "${_lmforge_cuda_link}"
ln -sf "${_lmforge_cuda_lib}/libcudart.so.13" "${_lmforge_cuda_link}/libcudart.so"
export LIBRARY_PATH="${_lmforge_cuda_link}${LIBRARY_PATH:+:${LIBRARY_PATH}}"
export LD_LIBRARY_PATH="${_lmforge_cuda_lib}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
unset _lmforge_cuda_lib _lmforge_cuda_link
