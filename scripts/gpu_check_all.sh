#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine lent for a few minutes:
#
#     scripts/gpu_check_all.sh OUT_DIR [SECONDS]
#
# 1. python -m minimoe.gpu_check (kernels, models, the full-size benchmark and its profile), at most
#    SECONDS (default 300); it rewrites OUT_DIR/gpu_check.json after every stage, so a run cut off
#    keeps what it measured;
# 2. compute-sanitizer's memcheck and racecheck over the odd-shape kernel checks (every array its own
#    allocation, so memcheck sees its bounds), at most 120 s each, where the machine has the tool.
# Everything printed is also in OUT_DIR/*.log.
set -uo pipefail
out=${1:?usage: scripts/gpu_check_all.sh OUT_DIR [SECONDS]}
seconds=${2:-300}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
timeout "$seconds" "$python" -m minimoe.gpu_check --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
echo "gpu_check exit status: ${PIPESTATUS[0]} (124: cut off at $seconds s)"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$sanitizer" ]; then
    echo "compute-sanitizer: not on this machine" | tee "$out/sanitizer.log"
    exit 0
fi
for tool in memcheck racecheck; do
    timeout 120 "$sanitizer" --tool "$tool" --print-limit 20 "$python" -m minimoe.gpu_check --stages kernels \
        --shapes odd --no-memory-pool --json "$out/$tool.json" > "$out/$tool.log" 2>&1
    echo "compute-sanitizer --tool $tool exit status: $? (124: cut off at 120 s)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|checks passed" "$out/$tool.log"
done
