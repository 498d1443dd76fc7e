#!/usr/bin/env bash
# The two-GPU overlap benchmark behind BENCHMARKS.md: examples/allreduce_overlap.py
# (NCCL, under torchrun) and examples/peer_allreduce_overlap.py (copy engines, one
# process) in several configurations, one JSON and one log per configuration in $1.
# Every configuration keeps NVLink multicast off.
set -euo pipefail
out=${1:?usage: scripts/bench_two_gpus.sh OUTPUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # before the cd below, so a relative path means the caller's
cd "$(dirname "$0")/.."
failures=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

run() {  # name, "VAR=value ..." (or ""), example arguments...
    local name=$1 settings=$2
    shift 2
    echo "== $name: $settings $*"
    # shellcheck disable=SC2086  # the settings are words on purpose
    env $settings python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
        examples/allreduce_overlap.py "$@" --bench "$out/$name.json" > "$out/$name.log" 2>&1 \
        || { echo "   failed; tail of $out/$name.log:"; tail -5 "$out/$name.log"
             failures=$((failures + 1)); return 0; }
    python3 - "$out/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for rank, f in enumerate(r["per_rank"]):
    print(f"   rank {rank}: compute {f['compute_ms']:.2f} comm {f['comm_ms']:.2f} "
          f"serial {f['serial_ms']:.2f} overlapped {f['overlapped_ms']:.2f} ms "
          f"-> {f['overlapped_vs_bound']:.3f} of the bound; two torch streams by hand "
          f"{f['by_hand_ms']:.2f} ms -> {f['by_hand_vs_bound']:.3f}")
PY
}

# One 8192^3 (or 6656^3) bf16 product per bucket, or four 4096^3 ones; the same
# bytes cut into 8 or 16 buckets; then the two SM-sharing knobs. Measured on
# 2 x H100: high priority helps a little, NCCL_MAX_CTAS=8 halves the
# all-reduce's bandwidth and loses overall.
run c8-256 "" --buckets 8 --bucket-mib 256 --matmuls 1
run c16-128-prio "" --buckets 16 --bucket-mib 128 --matmuls 1 --size 6656 --nccl-high-priority
run c16-128-ctas16-prio NCCL_MAX_CTAS=16 --buckets 16 --bucket-mib 128 --matmuls 1 --size 6656 --nccl-high-priority
run s16-128 "" --buckets 16 --bucket-mib 128 --matmuls 4 --size 4096
run s16-128-prio "" --buckets 16 --bucket-mib 128 --matmuls 4 --size 4096 --nccl-high-priority
run s16-128-ctas16-prio NCCL_MAX_CTAS=16 --buckets 16 --bucket-mib 128 --matmuls 4 --size 4096 --nccl-high-priority
run s16-256-prio "" --buckets 16 --bucket-mib 256 --matmuls 4 --size 4096 --nccl-high-priority
run_peer() {  # name, example arguments...
    local name=$1
    shift
    echo "== $name: peer copies $*"
    python3 examples/peer_allreduce_overlap.py --check "$@" --bench "$out/$name.json" \
        > "$out/$name.log" 2>&1 \
        || { echo "   failed; tail of $out/$name.log:"; tail -5 "$out/$name.log"
             failures=$((failures + 1)); return 0; }
    python3 - "$out/$name.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"   compute {f['compute_ms']:.2f} comm {f['comm_ms']:.2f} serial {f['serial_ms']:.2f} "
      f"overlapped {f['overlapped_ms']:.2f} ms -> {f['overlapped_vs_bound']:.3f} of the bound")
PY
}

# The same three step shapes with the reduction on the copy engines (fp16
# products here: CuPy has no bf16), compute at normal and at high priority.
run_peer p8-256 --buckets 8 --bucket-mib 256 --matmuls 1 --repeats 20
run_peer p8-256-prio --buckets 8 --bucket-mib 256 --matmuls 1 --repeats 20 --compute-priority high
run_peer p16-128 --buckets 16 --bucket-mib 128 --matmuls 1 --size 6656 --repeats 20
run_peer p16-128-prio --buckets 16 --bucket-mib 128 --matmuls 1 --size 6656 --repeats 20 --compute-priority high
run_peer ps16-128 --buckets 16 --bucket-mib 128 --matmuls 4 --size 4096 --repeats 20
run_peer ps16-128-prio --buckets 16 --bucket-mib 128 --matmuls 4 --size 4096 --repeats 20 --compute-priority high
if ((failures)); then
    echo "$failures configuration(s) failed"
    exit 1
fi
