# Source this: `source scripts/cuda_env.sh`. NVIDIA's CUDA 13.0 compiler and headers
# from PyPI wheels, in a venv kept outside the repository (~/.cache/lmforge/cuda-venv),
# for building the `cuda` feature on a machine without the CUDA toolkit (issue 23):
#   source scripts/cuda_env.sh && cargo check --release --features cuda
# compiles candle's CUDA kernels to PTX for CUDA_COMPUTE_CAP (default 90: H100/H200).
# Every wheel is pinned to 13.0: nvcc's front end (nvvm, crt) must match its ptxas, and
# PTX newer than the device's driver would not load there (the device has CUDA 13.0).
# Linking a binary still needs libcuda, libcublas, libcurand and libnvrtc: candle 0.11
# builds cudarc with `dynamic-linking` (see issue 23's notes).

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
