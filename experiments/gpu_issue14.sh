#!/usr/bin/env bash
# Issue 14, the GPU table: training-step time of every layer kind next to deel-torchlip and orthogonium
# (eager, torch.compile, compiled with CUDA-graph capture), lipconvnet_m per kind, and certification time.
# At most about 8 minutes on one H100: each step has its own time limit (490 s in all) and the script goes on
# after a failure, so the first tables survive a slow compile. Ratios are only compared within one table (one
# process, interleaved rounds).
#
#   bash experiments/gpu_issue14.sh            on the GPU machine, from the repository root
#   bash experiments/gpu_issue14.sh --smoke    on a CPU: every command at tiny sizes, 1 round (checks the script)
#
# Tables (Markdown) and a log go to $OUT (default runs/gpu_issue14). The GPU machine has torch but not the
# anchors: carry their wheels in .whl/ (pure Python; from the repository root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl deel-torchlip==1.0.5 orthogonium==0.0.4
# and name .whl in the device call's carry); they are installed into /tmp/site when present.
set -uo pipefail

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT=${OUT:-runs/gpu_issue14}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
LIPNET=("$PY" -m lipnet.cli)

if (( SMOKE )); then
    DEV=cpu; BACKEND=aot_eager; LIMITS=(900 900 900 900 900)
    LAYERS=(--batch 4 --width 4 --rounds 1)
    MODELS=(--model lipconvnet_xs --batch 2 --input-size 8 --rounds 1)
    CERT=(--model lipconvnet_xs --certify 8 --batch 4 --input-size 8 --rounds 1)
else
    DEV=cuda; BACKEND=inductor; LIMITS=(60 100 80 150 100)
    LAYERS=(--batch 64 --width 32 --rounds 30)
    MODELS=(--model lipconvnet_m --batch 256 --input-size 32 --rounds 5)
    CERT=(--model lipconvnet_m --certify 10000 --batch 256 --input-size 32 --rounds 3)
fi
COMMON=(--device "$DEV" --compile-backend "$BACKEND")

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log it, go on after a failure
    local name=$1 limit=$2; shift 2
    echo "== $name: $* (limit ${limit}s, load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/log.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$OUT/log.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
    $PY -c 'import deel.torchlip, orthogonium; print("anchors installed")' 2>&1 | tail -1
} >"$OUT/log.txt" 2>&1

# 1. small_cnn width 32, batch 64, every network eager (targets: Björck <= 0.8x deel-torchlip, <= 1.5x plain)
step layers-eager "${LIMITS[0]}" "${LIPNET[@]}" bench layers "${COMMON[@]}" "${LAYERS[@]}" --modes eager \
    --out "$OUT/layers_eager.md"
# 2. lipconvnet_m, every kind next to its anchor, eager (target: CPL <= 13.8 s per 50k-image epoch)
step models-eager "${LIMITS[1]}" "${LIPNET[@]}" bench models "${COMMON[@]}" "${MODELS[@]}" --modes eager \
    --out "$OUT/models_eager.md"
# 3. certification of 10,000 images against one eval pass (target: <= 1.1x)
step certify "${LIMITS[2]}" "${LIPNET[@]}" bench models "${COMMON[@]}" "${CERT[@]}" --kinds cpl,aol,bjorck \
    --out "$OUT/certify.md"
# 4. small_cnn compiled and CUDA-graphed: Björck, BCOP, AOL, deel-torchlip and the plain network in one table
step layers-compiled "${LIMITS[3]}" "${LIPNET[@]}" bench layers "${COMMON[@]}" "${LAYERS[@]}" --modes compile,graph \
    --networks "lipnet bjorck,lipnet bcop,lipnet aol,deel-torchlip,plain" --out "$OUT/layers_compiled.md"
# 5. lipconvnet_m with CPL compiled and CUDA-graphed, next to its eager step
step models-compiled "${LIMITS[4]}" "${LIPNET[@]}" bench models "${COMMON[@]}" "${MODELS[@]}" --kinds cpl \
    --no-anchors --modes eager,compile,graph --out "$OUT/models_compiled.md"

echo "tables in $OUT:"; ls "$OUT"
