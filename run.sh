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
         target      top2 | rand | least | all (all = top2, random and least; stage 2 untargeted)
         gpuNum      GPU index to use (optional)
       runs collect_gradients.py --numimg 20 ... then clever.py on that run's files; the output
       is also written to logs/<model>/<modeltype>/<model>_<modeltype>_<activation>_ord<order>_
       ns<nsamp>_nit<niters>_<target>_<mmdd_HHMMSS>.log
       environment: CLEVER_SAVE (results folder, default lipschitz_mat), CLEVER_LOGS (default
       logs), CLEVER_MODELS_DIR (default models), CLEVER_NUMIMG (default 20),
       CLEVER_NO_SETUP=1 (use the environment as it is, no pip), CLEVER_TEST_WORKERS (test
       processes, default one per core up to 4; 0: none)
USAGE
    exit 2
}

# Create or update the virtual environment from requirements.txt. A stamp of
# the requirements (and of CLEVER_TF) tells whether it is up to date.
ensure_env() {
    local want stamp="$VENV/.clever-requirements"
    want="$(cat requirements.txt; echo "CLEVER_TF=${CLEVER_TF:-}")"
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$PY" -c "import tensorflow, posix_ipc, scipy, sklearn, xdist, pytest_timeout" 2>/dev/null; then
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
    local model=$1 modeltype=$2 nsamp=$3 niters=$4 activation=$5 order=$6 target=$7 ttype
    # The original's target codes: top2 1, rand 2, least 4, all 15 (top-2, random and least).
    # In this toolkit's --target_type bits (common.TargetKind) bit 3 is user targets from
    # --ids and bit 4 untargeted, so 'all' is 7 here.
    case "$target" in
        top2) ttype=1 ;; rand|random) ttype=2 ;; least) ttype=4 ;; all) ttype=7 ;;
        *) echo "run.sh: error: target must be top2, rand, least or all, got '$target'" >&2; usage ;;
    esac
    case "$order" in 1|2) ;; *) echo "run.sh: error: order must be 1 or 2, got '$order'" >&2; usage ;; esac
    for n in "$nsamp" "$niters"; do
        case "$n" in ''|*[!0-9]*) echo "run.sh: error: nsamp and niters must be positive integers, got '$n'" >&2; usage ;; esac
    done
    if [ "$#" -ge 8 ]; then export CUDA_VISIBLE_DEVICES="$8"; fi
    [ -n "${CLEVER_NO_SETUP:-}" ] || ensure_env
    # Locations (defaults as the original's): CLEVER_SAVE results, CLEVER_LOGS logs,
    # CLEVER_MODELS_DIR trained models; CLEVER_NUMIMG images (the original's 20).
    local save="${CLEVER_SAVE:-lipschitz_mat}" logroot="${CLEVER_LOGS:-logs}"
    local models_dir="${CLEVER_MODELS_DIR:-models}" numimg="${CLEVER_NUMIMG:-20}"
    local logdir="$logroot/$model/$modeltype"
    local log="$logdir/${model}_${modeltype}_${activation}_ord${order}_ns${nsamp}_nit${niters}_${target}_$(date +%m%d_%H%M%S).log"
    mkdir -p "$logdir"
    echo "[run.sh] logging to $log" >&2
    local stage2=(--match "${nsamp}_${niters}_*_${activation}_order${order}.mat")
    # 'all' collects top2, random and least: CLEVER-u is per image the minimum over them.
    [ "$target" = all ] && stage2+=(--untargeted)
    {
        "$PY" collect_gradients.py --numimg "$numimg" -d "$model" --model_name "$modeltype" \
            --batch_size "$nsamp" --Nsamps "$nsamp" --Niters "$niters" --activation "$activation" \
            --target_type "$ttype" --order "$order" --models_dir "$models_dir" -s "$save" \
            --no_progress
        "$PY" clever.py "$save/${model}_${modeltype}" "${stage2[@]}"
    } 2>&1 | tee "$log"
}

case "${1:-}" in
    demo) shift; demo "$@" ;;
    # Test files are spread over one worker per core (at most 4: each loads TensorFlow);
    # CLEVER_TEST_WORKERS=0 runs them in this process. A worker that dies ends the run
    # at once, naming its test: pytest-xdist 3.8 can wait forever after replacing a
    # crashed --dist loadfile worker (pytest-dev/pytest-xdist#1378).
    test) shift; ensure_env
          exec "$PY" -m pytest -n "${CLEVER_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile \
              --max-worker-restart 0 "$@" ;;
    ""|-h|--help|help) usage ;;
    *) original "$@" ;;
esac
