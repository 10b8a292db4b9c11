#!/usr/bin/env bash
# The accuracy suite's long runs on one GPU, as several processes side by side: a batch-1 decode of a
# 135M model leaves the GPU mostly idle, so N processes finish nearly N times sooner than one.
#
#   bash benchmarks/accuracy_gpu.sh MODEL.gguf PHASE SECONDS
#
# PHASE "4k": the suite at ~4K tokens on the fit and held-out splits, and long-generation fidelity;
# PHASE "7k": the suite at ~7K tokens on both splits; PHASE "4k_more": 4 more prompts of each niah
# task of the held-out split at ~4K (prompts 3-6; "4k" ran 0-2); PHASE "guard": the 4K runs and fidelity
# again, with the default head and its guarded variant only; PHASE "select": the head's candidate variants
# (benchmarks/ruler_select.py) on the fit split at ~4K (10 prompts per task) and ~7K (4), budgets 3% and 6%,
# then the rule of ruler_select.py picks one and writes its name to $CHOICE (default ~/ruler_chosen_head.txt);
# PHASE "chosen": that variant, guarded and not, with oracle top-k on the held-out split at ~4K (prompts
# 0-2 of every task, 3-6 of the niah tasks) and long-generation fidelity; PHASE "chosen_alone": the same
# held-out runs for the chosen variant alone, unguarded (CHOICE names it); PHASE "round4": the predicted
# query's variants with the default and oracle on the fit split (for ruler_select.py's rule) and, without
# them, on the held-out split and fidelity. Each job stops after SECONDS (a job cut short
# keeps the prompts it finished: the benchmarks write their JSON after every prompt); logs and JSON go
# to benchmarks/results/ and, packed in one archive, to $OUT when the device tool set it.
set -u
model=$1 phase=$2 limit=$3
heads="d72-80_look1 v1 streaming quest oracle"
guard_heads=d72-80_look1
budgets="0.03 0.06 0.12 0.25"
choice=${CHOICE:-$HOME/ruler_chosen_head.txt}  # the select phase writes it, the chosen phase reads it
logs=benchmarks/results/logs_$phase
mkdir -p "$logs"
out=${OUT:-}
unset OUT  # many small JSON files: they come back packed, below
run() {  # NAME ARGS...
    local name=$1
    shift
    PYTHONUNBUFFERED=1 timeout "$limit" python -m "$@" >"$logs/$name.log" 2>&1 &
}
ruler() {  # SPLIT LENGTH PROMPTS NAME TASKS... (FIRST: the first prompt's index, 0 unless set)
    local split=$1 length=$2 prompts=$3 name=$4
    shift 4
    run "$name" benchmarks.ruler --model "$model" --split "$split" --lengths "$length" --prompts "$prompts" \
        --first-prompt "${FIRST:-0}" --budgets $budgets --heads $heads --guard-heads $guard_heads --tasks "$@" \
        --out "$name"
}
fit_split() {  # LENGTH PROMPTS PREFIX: each fit task in its own process
    for task in niah_single_noise niah_single_text niah_multikey_text; do
        ruler fit "$1" "$2" "${3}_fit_$task" "$task"
    done
}
heldout_4k() {  # PREFIX: prompts 0-2 of every held-out task, in four processes
    ruler heldout 4096 3 "${1}_heldout_a" niah_single_noise niah_single_text niah_single_word
    ruler heldout 4096 3 "${1}_heldout_b" niah_single_uuid niah_multikey_text niah_multikey_needles
    ruler heldout 4096 3 "${1}_heldout_c" niah_multikey_uuid niah_multivalue niah_multiquery
    ruler heldout 4096 3 "${1}_heldout_d" variable_tracking common_words frequent_words
}
fidelity() {  # PREFIX ARGS...: one process per prompt (0-2)
    local prefix=$1
    shift
    for prompt in 0 1 2; do
        run "${prefix}_$prompt" benchmarks.fidelity --model "$model" --context 3072 --new-tokens 1024 --prompts 1 \
            --first-prompt "$prompt" --budgets 0.06 0.12 --out "${prefix}_$prompt" "$@"
    done
}
niah_more=(niah_single_noise niah_single_text niah_single_word niah_single_uuid niah_multikey_text
    niah_multikey_needles niah_multikey_uuid niah_multivalue niah_multiquery)
heldout_4k_more() {  # PREFIX: prompts 3-6 of every held-out niah task, in three processes
    FIRST=3 ruler heldout 4096 4 "${1}_heldout_more_a" "${niah_more[@]:0:3}"
    FIRST=3 ruler heldout 4096 4 "${1}_heldout_more_b" "${niah_more[@]:3:3}"
    FIRST=3 ruler heldout 4096 4 "${1}_heldout_more_c" "${niah_more[@]:6:3}"
}
case $phase in
4k)
    fit_split 4096 6 ruler_4k
    heldout_4k ruler_4k
    fidelity fidelity_gpu
    ;;
7k)
    fit_split 7168 4 ruler_7k
    ruler heldout 7168 2 ruler_7k_heldout_a niah_single_noise niah_single_text niah_single_word niah_single_uuid
    ruler heldout 7168 2 ruler_7k_heldout_b niah_multikey_text niah_multikey_needles niah_multikey_uuid
    ruler heldout 7168 2 ruler_7k_heldout_c niah_multivalue niah_multiquery variable_tracking
    ruler heldout 7168 2 ruler_7k_heldout_d common_words frequent_words
    ;;
4k_more)  # one process per task
    for task in "${niah_more[@]}"; do
        FIRST=3 ruler heldout 4096 4 "ruler_4k_heldout_more_$task" "$task"
    done
    ;;
guard)  # the 4K runs again with the default head and its guarded variant only (evaluation/shared_prefill.py
    # had let one method's guard hold leak into the next guarded method; fixed, tested in test_shared_prefill.py)
    heads=d72-80_look1
    fit_split 4096 6 ruler_guard_4k
    heldout_4k ruler_guard_4k
    heldout_4k_more ruler_guard_4k
    fidelity fidelity_gpu_guard --heads d72-80_look1 --guard-heads d72-80_look1
    ;;
select)  # fit split only: what ruler_select.py chooses from
    heads="$(python -c 'from benchmarks.ruler_select import CANDIDATES; print(*CANDIDATES)') oracle"
    guard_heads="" budgets="0.03 0.06"
    for task in niah_single_noise niah_single_text niah_multikey_text; do
        ruler fit 4096 5 "ruler_select_4k_${task}_a" "$task"
        FIRST=5 ruler fit 4096 5 "ruler_select_4k_${task}_b" "$task"
        ruler fit 7168 4 "ruler_select_7k_$task" "$task"
    done
    wait
    python -m benchmarks.ruler_select --inputs 'ruler_select_[47]k_*' --choice "$choice" >"$logs/select.log" 2>&1
    ;;
chosen)  # the variant the select phase chose, on the held-out split
    chosen=$(cat "$choice") || exit 2
    heads="$chosen oracle" guard_heads=$chosen
    heldout_4k ruler_chosen_4k
    heldout_4k_more ruler_chosen_4k
    fidelity fidelity_gpu_chosen --heads "$chosen" oracle --guard-heads "$chosen"
    ;;
chosen_alone)  # the chosen variant alone on the held-out split at ~4K (dense and oracle: the runs before)
    chosen=$(cat "$choice") || exit 2
    heads=$chosen guard_heads=""
    heldout_4k ruler_chosen_alone_4k
    heldout_4k_more ruler_chosen_alone_4k
    ;;
round4)  # the predicted query (retrieval/query_prediction.py) against the default: fit rows for the rule of
    # ruler_select.py (CANDIDATES_ROUND4; the third round's five fit tasks), held-out rows to report
    heads="$(python -c 'from benchmarks.ruler_select import CANDIDATES_ROUND4; print(*CANDIDATES_ROUND4)') oracle"
    guard_heads="" budgets="0.03 0.06"
    for task in niah_single_noise niah_single_text niah_multikey_text niah_multiquery niah_multivalue; do
        ruler fit 4096 8 "ruler_round4_4k_$task" "$task"
    done
    heads="$(python -c 'from benchmarks.ruler_select import CANDIDATES_ROUND4; print(*CANDIDATES_ROUND4[1:])')"
    budgets="0.03 0.06 0.12 0.25"
    heldout_4k ruler_round4_4k
    heldout_4k_more ruler_round4_4k
    fidelity fidelity_gpu_round4 --heads $heads --guard-heads
    ;;
*)
    echo "unknown phase $phase (4k, 7k, 4k_more, guard, select, chosen, chosen_alone or round4)" >&2
    exit 2
    ;;
esac
wait
nvidia-smi --query-gpu=name,memory.used --format=csv >"$logs/gpu.txt" 2>&1
if [ -n "$out" ]; then
    tar czf "$out/accuracy_$phase.tar.gz" "$logs" benchmarks/results/ruler_*k_*.json benchmarks/results/ruler_guard_*.json \
        benchmarks/results/ruler_select_*.json benchmarks/results/ruler_chosen_*.json benchmarks/results/ruler_round4_*.json \
        benchmarks/results/fidelity_gpu_*.json 2>/dev/null
fi
tail -n 3 "$logs"/*.log
