#!/usr/bin/env bash
# Mutation check for the core's GPU race tests: remove one synchronization at a
# time in a scratch copy of the tree, run the tests that guard it, and expect
# them to FAIL (after they passed on the untouched tree). Prints each mutation's
# outcome with the first lines of its failure; exits non-zero if a mutation
# survived (its tests still passed), which would mean the tests prove nothing.
# MUTATIONS="name ..." runs only the named ones.
set -u
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
status=0

mutate() {  # name, file, exact line to remove, tests...
    local name=$1 file=$2 line=$3
    shift 3
    if [[ -n ${MUTATIONS:-} && " $MUTATIONS " != *" $name "* ]]; then return; fi
    rm -rf "$scratch/tree" && cp -r . "$scratch/tree"
    if ! grep -qxF "$line" "$scratch/tree/$file"; then
        echo "MUTATION $name: line not found in $file"; status=1; return
    fi
    # A test that fails with the synchronization in place proves nothing when it
    # fails without it: each mutation's tests must pass on the untouched tree first.
    if ! (cd "$scratch/tree" && CUPYSTREAMS_REQUIRE_GPU=${CUPYSTREAMS_REQUIRE_GPU:-1} \
            python3 -m pytest -q -p no:cacheprovider "$@" > "$scratch/$name.baseline.log" 2>&1); then
        echo "MUTATION $name: its tests FAIL on the untouched tree; tail:"
        tail -5 "$scratch/$name.baseline.log"; status=1; return
    fi
    # The line becomes `pass` at its own indentation, so a block it was alone in stays valid.
    awk -v target="$line" '$0 == target { match($0, /^ */); print substr($0, 1, RLENGTH) "pass"; next } { print }' \
        "$file" > "$scratch/tree/$file"
    if (cd "$scratch/tree" && CUPYSTREAMS_REQUIRE_GPU=${CUPYSTREAMS_REQUIRE_GPU:-1} \
            python3 -m pytest -q -p no:cacheprovider "$@" > "$scratch/$name.log" 2>&1); then
        echo "MUTATION $name: SURVIVED (tests passed without the synchronization)"; status=1
    else
        echo "MUTATION $name: caught — $(grep -cE '^FAILED' "$scratch/$name.log") test(s) failed:"
        grep -E '^E ' "$scratch/$name.log" | head -3
    fi
}

mutate lease-wait cupystreams/_lease.py "            stream.wait_event(event)" \
    tests/test_pool_gpu.py::test_wait_orders_two_leases \
    tests/test_multi_gpu.py::test_cross_device_wait_orders_a_peer_copy
mutate moved-key-wait cupystreams/_pool.py \
    "                self._backend.wait_event(stream._handle, state.last_event._handle)" \
    tests/test_pool_gpu.py::test_moved_affinity_key_orders_on_the_gpu
mutate nccl-example-wait examples/cupy_nccl_overlap.py \
    "                comm.wait(compute)  # bucket complete before it is reduced" \
    tests/test_multi_gpu.py::test_cupy_nccl_example_reduces_on_comm_leases
mutate torchrun-example-wait examples/allreduce_overlap.py \
    "        comm.wait(compute)  # on the device: bucket i is complete before it is reduced" \
    tests/test_multi_gpu.py::test_allreduce_example_reduces_correctly_under_torchrun
rm -rf "$scratch"
exit $status
