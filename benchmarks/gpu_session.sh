#!/usr/bin/env bash
# The GPU checks of one short device session, as one prepared command.
#
# Why this exists: what opdflow can only check on a GPU (the Triton kernels compiled for real,
# the CUDA-graph sampler, the speed and memory targets) has never been run, because sessions
# rarely get a GPU, and when one does it gets about 15 device-minutes, start-up included, and at
# most 10 minutes a command (the tool library's device README). So the whole check is prepared
# here, most important first, each step bounded by the time left, every result written under
# $OUT as soon as it exists (a command cut off still returns what it wrote):
#
#   1. tests/kernels on CUDA: the Triton kernels, schedules and fused linear against the float64
#      reference (compiled, not interpreted);
#   2. tests/test_native.py -m gpu: the CUDA-graph sampler against eager and transformers;
#   3. benchmarks/bench_kernels.py with the time left, issue 3's target shape first;
#   4. benchmarks/bench_rollout.py (native vs opdflow's transformers sampler, batch 64) if time is left.
#
# Here, once (needs the package index):   bash benchmarks/gpu_session.sh wheels
#   downloads into .whl/ (git-ignored) what the GPU machine's image lacks: Liger-Kernel (the
#   baseline) and pydantic with the typing-extensions it needs (opdflow.infra imports it).
# There, through the `run` tool with carry [".whl"] and timeout_s = SECONDS + 60:
#   bash benchmarks/gpu_session.sh run SECONDS        (default 480)
# Then here: append $OUT's kernels.jsonl / rollout.jsonl (the run tool's files_at) to
# benchmarks/results/, and `python benchmarks/bench_kernels.py --table
# benchmarks/results/kernels.jsonl` gives the tables for kernels/README.md.
set -u

wheels() {
    local py=${PYTHON:-python3}
    mkdir -p .whl
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 || exit 1
    ls -l .whl
}

run() {
    local budget=${1:-480} py=${PYTHON:-python3} t0=$SECONDS
    OUT=${OUT:-$PWD/gpu-session-out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    local wheels=${WHEELS:-.whl}
    if compgen -G "$wheels/*.whl" >/dev/null; then
        # a failed install costs the Liger rows and the sampler's tests, not the session
        if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/opdflow-site "$wheels"/*.whl >"$OUT/wheels.log" 2>&1; then
            export PYTHONPATH=/tmp/opdflow-site${PYTHONPATH:+:$PYTHONPATH}
        else
            echo "wheels: install failed (see wheels.log); going on without them" | tee -a "$OUT/summary.txt"
        fi
    fi
    # opdflow without installing it (nothing can be fetched there): pyproject.toml's package-dir
    # mapping as links, first on the path.
    local src
    src=$(mktemp -d)
    mkdir "$src/opdflow"
    for d in flows tasks kernels evals infra; do ln -s "$PWD/$d" "$src/opdflow/$d"; done
    export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}

    left() { echo $((budget - (SECONDS - t0))); }
    step() {  # step NAME SECONDS COMMAND...: bounded, logged to $OUT/NAME.log, summarized
        local name=$1 limit=$2 s=$SECONDS rc
        shift 2
        if [ "$limit" -lt 30 ]; then
            echo "$name: skipped, its time limit would be ${limit}s" | tee -a "$OUT/summary.txt"
            return
        fi
        timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
        rc=$?
        echo "$name: exit $rc after $((SECONDS - s))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
        tail -n 3 "$OUT/$name.log"
    }

    {
        nvidia-smi
        "$py" -c "import torch, triton, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); print(torch.cuda.get_device_name(0))"
        git rev-parse HEAD 2>/dev/null
        git status --short 2>/dev/null | head -20
    } >"$OUT/env.txt" 2>&1
    tail -n 3 "$OUT/env.txt"

    local pytest=("$py" -m pytest -q -p no:cacheprovider --junitxml)
    step kernel-tests $(($(left) / 4 < 150 ? $(left) / 4 : 150)) "${pytest[@]}" "$OUT/kernel-tests.xml" tests/kernels
    step native-tests $(($(left) / 4 < 120 ? $(left) / 4 : 120)) "${pytest[@]}" "$OUT/native-tests.xml" \
        tests/test_native.py -m gpu
    # bench_kernels starts no measurement after --budget-s; one can take ~1 min (torch.compile).
    local kb=$(($(left) - 150))
    step bench-kernels $((kb + 90)) "$py" benchmarks/bench_kernels.py --budget-s "$kb" --out "$OUT/kernels.jsonl"
    step bench-rollout $(($(left) - 10)) "$py" benchmarks/bench_rollout.py --batches 64 --repeats 1 \
        --providers lm_sample native --out "$OUT/rollout.jsonl"
    echo "total $((SECONDS - t0))s of ${budget}s" | tee -a "$OUT/summary.txt"
}

case "${1:-}" in
    wheels) wheels ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 wheels | run [SECONDS]" >&2; exit 2 ;;
esac
