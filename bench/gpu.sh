#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, one stage per argument, on the lent GPU box (device tool):
#   bash bench/gpu.sh card sweep-shapes-eager preview-shapes ...
# Each stage runs under its own `timeout` and writes its JSON and log under $OUT, so a stage that
# runs out of time still leaves what the others measured. The box has no diffusers: the wheels
# in .whl/ (carried, git-ignored) are installed into /tmp/site first.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name (limit ${secs}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0))s"; tail -n 12 "$OUT/$name.log"
}
for s in "$@"; do
  case $s in
    card) { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
            python3 -c "import sys, torch, diffusers, transformers; print(sys.version.split()[0], torch.__version__, diffusers.__version__, transformers.__version__)"
            nproc; date -u; } > "$OUT/card.txt" 2>&1; cat "$OUT/card.txt" ;;
    sweep-shapes-eager) stage $s 200 python3 bench/bench_sweep.py --model shapes --mode eager --rounds 2 --out "$OUT" ;;
    sweep-sd15-eager) stage $s 260 python3 bench/bench_sweep.py --model sd15 --mode eager --rounds 2 --sweep-reps 2 --out "$OUT" ;;
    sweep-sd15-compiled) stage $s 300 python3 bench/bench_sweep.py --model sd15 --mode compiled --rounds 2 --sweep-reps 3 --out "$OUT" ;;
    # issue 25 item 4: full-size SDXL / SD3 / reduced-depth Flux, random weights, 1024², 4 cutoffs x 4 seeds
    sweep-sdxl|sweep-sd3|sweep-flux) stage $s ${FAM_LIMIT:-200} python3 bench/bench_sweep.py --model ${s#sweep-} --mode eager \
        --size 1024 --steps 20 --seeds 4 --cutoffs 0,0.3,0.6,1 --rounds 1 --sweep-reps 2 --cost-repeats 3 --out "$OUT" ;;
    # issue 25 item 2: the compiled embedded model's unguided step (recompiles, graphs, launches)
    diag-cutoff) stage $s 150 env TORCH_LOGS=recompiles,perf_hints python3 bench/diag_cutoff_compiled.py --out "$OUT/diag-cutoff.json" ;;
    rec-eager-5steps) stage $s 90 python3 bench/bench_recorder.py --modes eager --steps 5 --reps 200 --variants record-target --out "$OUT/recorder-eager-5steps.json" ;;
    rec-eager-27) stage $s 120 python3 bench/bench_recorder.py --modes eager --reps 30 --variants record-target --out "$OUT/recorder-eager.json" ;;
    rec-compiled-27) stage $s 160 python3 bench/bench_recorder.py --modes compiled --reps 30 --variants record-target,cutoff-0.5,no-cfg --out "$OUT/recorder-compiled.json" ;;
    pack) (cd "$OUT" && tar czf "/tmp/pack-$(date -u +%H%M%S).tgz" --exclude='pack-*' . && rm -f -- *.json *.log *.txt && mv /tmp/pack-*.tgz .) ; ls -la "$OUT" ;;
    sweep-shapes-compiled) stage $s 170 python3 bench/bench_sweep.py --model shapes --mode compiled --rounds 2 --out "$OUT" ;;
    sweep-shapes-compiled-after) stage $s 190 python3 bench/bench_sweep.py --model shapes --mode compiled --rounds 2 --oneshot-after --out "$OUT" ;;
    sweep-shapes-eager-after) stage $s 220 python3 bench/bench_sweep.py --model shapes --mode eager --rounds 2 --oneshot-after --out "$OUT" ;;
    sweep-sd15-eager-after) stage $s 280 python3 bench/bench_sweep.py --model sd15 --mode eager --rounds 2 --oneshot-after --out "$OUT" ;;
    preview-shapes) stage $s 120 python3 bench/bench_preview.py --model shapes --device cuda --dtype float32 --steps 25 --reps 15 --out "$OUT/preview-shapes.json" ;;
    preview-sd15) stage $s 150 python3 bench/bench_preview.py --device cuda --steps 25 --reps 8 --variants preview-x0,preview-latent,preview-x0-pil,preview-x0-map --out "$OUT/preview-sd15.json" ;;
    rec-eager) stage $s 240 python3 bench/bench_recorder.py --modes eager --reps 30 --hooks 5 --variants cutoff-0.5,official-cutoff-0.5,record-target --out "$OUT/recorder-eager.json" ;;
    cutoff-eager) stage $s 150 python3 bench/bench_recorder.py --modes eager --reps 30 --hooks 5 --variants cutoff-0.5,official-cutoff-0.5 --out "$OUT/cutoff-eager.json" ;;
    rec-compiled) stage $s 240 python3 bench/bench_recorder.py --modes compiled --reps 30 --variants cutoff-0.5,official-cutoff-0.5,record-target,no-cfg --out "$OUT/recorder-compiled.json" ;;
    scales-shapes) stage $s 200 python3 bench/bench_scales.py --model shapes --out "$OUT" ;;
    scales-sd15) stage $s 300 python3 bench/bench_scales.py --model sd15 --out "$OUT" ;;
    cuda-tests) stage $s 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
