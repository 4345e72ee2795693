#!/usr/bin/env bash
# Regenerate the reference runs of docs/bench.md in one pass, each text report headed by the
# command that produced it and the commit it measured.
#
#     bash benchmarks/regenerate_figures.sh            # every run below (about 50 min on 2 cores)
#     bash benchmarks/regenerate_figures.sh core demo  # only the named ones
#
# Names: core demo paper llm exponents_quiet accuracy llm_paths. Run on a quiet machine from a clean checkout
# (the commit line says "+dirty" when src/ has uncommitted changes). The benchmarks that write
# their own header (bench_policy, bench_latency, bench_paths, bench_dormancy, profile_paths,
# bench_streams, bench_distributed) are run by their own commands, given in docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
figures=docs/figures
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain -- src)" ]; then commit="$commit+dirty"; fi

run() {  # run NAME COMMAND...: stdout to docs/figures/NAME.txt behind a two-line header
    local name=$1
    shift
    echo "== $name: $*" >&2
    {
        echo "# \$ $*"
        echo "# commit $commit"
        "$@"
    } >"$figures/$name.txt.new"
    mv "$figures/$name.txt.new" "$figures/$name.txt"
}

wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(core demo paper llm exponents_quiet accuracy llm_paths)
for name in "${wanted[@]}"; do
    case $name in
    core) run bench_core python benchmarks/bench_core.py --json $figures/bench_core.json ;;
    demo) run demo dynattn demo --json $figures/demo.json ;;
    paper)
        run paper dynattn bench --regime paper --storage dense,implicit --policy 0.01,0.1,1,10,100 \
            --quiet-wait 900 --noisy-retries 3 --progress plain --json $figures/paper.json
        dynattn bench --load $figures/paper.json --plot $figures --figures tradeoff,scaling,mix >/dev/null
        ;;
    llm)
        run llm dynattn bench --regime llm --policy 0.01,0.1,1,10,100 \
            --quiet-wait 900 --noisy-retries 3 --progress plain --json $figures/llm.json
        dynattn bench --load $figures/llm.json --plot $figures --figures tradeoff,scaling,mix >/dev/null
        ;;
    exponents_quiet)
        run exponents_quiet env OPENBLAS_NUM_THREADS=1 dynattn bench --regime paper \
            --sizes 256,362,512,724,1024,1448,2048,2896,4096 --taus 0.5,0.75,1 --storage dense \
            --baselines eager --repeats 5 --sample-s 0.3 --progress plain --json $figures/exponents_quiet.json
        for flag in "" --fit-per-gemm; do
            echo
            echo "# \$ dynattn theory --load $figures/exponents_quiet.json${flag:+ $flag}"
            dynattn theory --load $figures/exponents_quiet.json $flag
        done >>$figures/exponents_quiet.txt
        ;;
    accuracy) run bench_accuracy python benchmarks/bench_accuracy.py ;;
    llm_paths) run bench_llm python benchmarks/bench_llm.py ;;
    *)
        echo "unknown run $name (expected: core demo paper llm exponents_quiet accuracy llm_paths)" >&2
        exit 2
        ;;
    esac
done
