#!/usr/bin/env bash
# CLEVER toolkit driver.
#   ./run.sh demo     set up .venv, train the digits models if missing, run stage 1 and 2
#   ./run.sh test     set up .venv, run the test suite (extra arguments go to pytest)
#   ./run.sh model modeltype nsamp niters activation order target [gpuNum]
#                     the original tool's interface, e.g. ./run.sh mnist normal 1024 500 relu 1 top2
set -euo pipefail
cd "$(dirname "$0")"
VENV="${CLEVER_VENV:-.venv}"
PY="$VENV/bin/python"

usage() {
    cat >&2 <<'USAGE'
usage: ./run.sh demo
       ./run.sh test [pytest arguments]
       ./run.sh model modeltype nsamp niters activation order target [gpuNum]
         model       digits | mnist | cifar
         modeltype   normal | distilled | brelu | 2-layer (or a model file stem in models/)
         nsamp       samples per batch (N_s), e.g. 1024
         niters      number of batches (N_b), e.g. 500
         activation  relu | tanh | sigmoid | elu | softplus | hard_sigmoid | arctan
         order       1 or 2
         target      top2 | rand | least | all
         gpuNum      GPU index to use (optional)
USAGE
    exit 2
}

# Create or update the virtual environment from requirements.txt. A stamp of
# the requirements (and of CLEVER_TF) tells whether it is up to date.
ensure_env() {
    local want stamp="$VENV/.clever-requirements"
    want="$(cat requirements.txt; echo "CLEVER_TF=${CLEVER_TF:-}")"
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$PY" -c "import tensorflow, posix_ipc, scipy, sklearn" 2>/dev/null; then
        return 0
    fi
    echo "[run.sh] setting up $VENV from requirements.txt (a few minutes the first time)" >&2
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    "$PY" -m pip install -q --upgrade pip >&2
    if [ -n "${CLEVER_TF:-}" ]; then
        grep -v '^tensorflow-cpu' requirements.txt > "$VENV/requirements-custom-tf.txt"
        "$PY" -m pip install -q -r "$VENV/requirements-custom-tf.txt" "$CLEVER_TF" >&2
    else
        "$PY" -m pip install -q -r requirements.txt >&2
    fi
    printf '%s' "$want" > "$stamp"
}

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

demo() {
    ensure_env
    local save="lipschitz_mat/demo"
    local missing=() name file
    for name in normal:digits distilled:digits-distilled-100 brelu:digits_brelu 2-layer:digits_2layer; do
        file="models/${name#*:}.keras"
        [ -f "$file" ] || missing+=("${name%%:*}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "[run.sh] training the digits models: ${missing[*]}" >&2
        "$PY" train_models.py --dataset digits --models "$(IFS=,; echo "${missing[*]}")"
    fi
    echo "[run.sh] stage 1: gradient norms of the digits 'normal' model (targets top2, random, least)" >&2
    "$PY" collect_gradients.py -d digits -m normal -n 5 -N 256 -i 50 -s "$save" -q
    echo "[run.sh] stage 1: untargeted (all classes) for 2 images" >&2
    "$PY" collect_gradients.py -d digits -m normal -n 2 -N 128 -i 50 --targets all -s "$save/untargeted" -q
    echo "[run.sh] stage 2: CLEVER scores" >&2
    "$PY" clever.py "$save/digits_normal" --summary "$save/summary.json" | grep '^\[STATS\]\[L0\]'
    "$PY" clever.py "$save/untargeted/digits_normal" --untargeted | grep '^\[STATS\]\[L[01]\]'
    echo "[run.sh] per-file lines: python clever.py $save/digits_normal; records: $save/summary.json" >&2
}

original() {
    [ "$#" -ge 7 ] || usage
    local model=$1 modeltype=$2 nsamp=$3 niters=$4 activation=$5 order=$6 target=$7
    case "$target" in
        top2) ttype=1 ;; rand|random) ttype=2 ;; least) ttype=4 ;; all) ttype=16 ;;
        *) echo "run.sh: error: target must be top2, rand, least or all, got '$target'" >&2; usage ;;
    esac
    case "$order" in 1|2) ;; *) echo "run.sh: error: order must be 1 or 2, got '$order'" >&2; usage ;; esac
    if [ "$#" -ge 8 ]; then export CUDA_VISIBLE_DEVICES="$8"; fi
    ensure_env
    local logdir="logs/$model/$modeltype"
    local log="$logdir/${model}_${modeltype}_${nsamp}_${niters}_${activation}_order${order}_${target}_$(date +%Y%m%d_%H%M%S).log"
    mkdir -p "$logdir"
    echo "[run.sh] logging to $log" >&2
    local untargeted=()
    [ "$target" = all ] && untargeted=(--untargeted)
    {
        "$PY" collect_gradients.py -d "$model" -m "$modeltype" -N "$nsamp" -i "$niters" \
            --activation "$activation" --order "$order" --target_type "$ttype"
        "$PY" clever.py "lipschitz_mat/${model}_${modeltype}" "${untargeted[@]}"
    } 2>&1 | tee "$log"
}

case "${1:-}" in
    demo) shift; demo "$@" ;;
    test) shift; ensure_env; exec "$PY" -m pytest "$@" ;;
    ""|-h|--help|help) usage ;;
    *) original "$@" ;;
esac
