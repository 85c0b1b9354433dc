# Sourced by compare.sh and quality.sh: the PyTorch venv, the release build, and
# both sides pinned to $THREADS threads (2 unless set).
VENV=$(realpath -m "${VENV:-bench/.venv}")
THREADS=${THREADS:-2}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch transformers
fi
cargo build --release --quiet
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS
