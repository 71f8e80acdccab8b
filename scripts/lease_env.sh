# Sourced at the start of each *_lease.sh script, from the repository root, with OUT set (and L,
# the log, if not OUT/gpu.log): the output folder, the lease's clock and log, and the Python
# path. `el` prints the seconds since the start; `log MSG` writes "[Ns] MSG" to the terminal
# and the log. A machine without internet needs the packages its image lacks as wheels in
# .whl/ (for a stock PyTorch image: diffusers and importlib_metadata); they are installed to
# /tmp/site.
mkdir -p "$OUT"
S=$(date +%s)
L=${L:-$OUT/gpu.log}
el() { echo $(( $(date +%s) - S )); }
log() { echo "[$(el)s] $*" | tee -a "$L"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
