#!/usr/bin/env bash
# fuzz/smoke.sh: the CI fuzz smoke. Builds every fuzz target (cargo fuzz, nightly
# features through RUSTC_BOOTSTRAP=1 on stable), then runs each one for
# SMOKE_SECONDS (default 20) on its committed corpus, one at a time. Prints one line
# per target; exits non-zero when any target crashes, hangs or fails to run.
# New inputs go to a scratch directory: the committed corpus is never changed.
# Crash inputs land in fuzz/artifacts/TARGET/ (ignored by git).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
export RUSTC_BOOTSTRAP=1
secs=${SMOKE_SECONDS:-20}

if ! cargo fuzz --version >/dev/null 2>&1; then
    bash ../softhsm-setup/setup.sh --dev
fi

echo "==> fuzz smoke: cargo fuzz build (all targets), then ${secs} s per target"
build_log=$(mktemp)
scratch=$(mktemp -d)
trap 'rm -rf "$build_log" "$scratch"' EXIT
if ! nice -n 10 cargo fuzz build >"$build_log" 2>&1; then
    tail -n 40 "$build_log"
    echo "fuzz smoke: FAILED: cargo fuzz build"
    exit 1
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="target/$triple/release"

failed=0
for t in $(cargo fuzz list); do
    mkdir -p "$scratch/$t" "artifacts/$t"
    log="$scratch/$t.log"
    if nice -n 10 "$bin_dir/$t" "$scratch/$t" "corpus/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -jobs=1 -workers=1 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
        echo "fuzz smoke: $t: ok (${secs} s, ${execs:-?} execs, cov ${cov:-?})"
    else
        failed=1
        grep -E '^==[0-9]+==|panicked|SUMMARY|Test unit written' "$log" | head -n 8 | sed 's/^/    /'
        echo "fuzz smoke: $t: FAILED (crash input in fuzz/artifacts/$t/)"
    fi
done
exit "$failed"
