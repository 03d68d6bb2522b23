#!/usr/bin/env bash
# Source line/branch coverage of native/src reached by the native fuzz
# corpora (what fuzz/RESULTS.md reports): each harness is built with clang's
# source-based coverage and native/fuzz/replay_main.c, run over the working
# corpus a campaign grew (build/fuzz/corpus/<target>, or CORPUS_DIR/<target>)
# plus the seeds and kept crashes, and llvm-cov reports native/src.
#   fuzz/native_coverage.sh [target...]        (default: virtq blk net vsock uring)
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/fuzz/coverage
mkdir -p "$out"
corpus_root=${CORPUS_DIR:-build/fuzz/corpus}
for t in "${@:-virtq blk net vsock uring}"; do
  for t in $t; do
    src="native/src/virtq.c"
    wrap=""
    if [ "$t" = uring ]; then src="$src native/src/blk.c"; fi
    if [ "$t" != virtq ]; then src="$src native/src/$t.c"; wrap="-Wl,--wrap=pv_vq_pop,--wrap=pv_vq_push"; fi
    if [ "$t" = vsock ]; then src="$src native/src/vsock_tx.c"; fi
    clang -O0 -g -std=gnu11 -fprofile-instr-generate -fcoverage-mapping -Inative/include $wrap \
      native/fuzz/replay_main.c "native/fuzz/fuzz_$t.c" $src -o "$out/$t"
    dirs=""
    for d in "$corpus_root/$t" "native/fuzz/corpus/$t" "native/fuzz/crashes/$t"; do
      [ -d "$d" ] && dirs="$dirs $d"
    done
    rm -f "$out/$t.profraw"
    LLVM_PROFILE_FILE="$out/$t.profraw" "$out/$t" $dirs 2>/dev/null
    llvm-profdata merge -o "$out/$t.profdata" "$out/$t.profraw"
    echo "== $t ($(find $dirs -type f | wc -l) inputs)"
    llvm-cov report "$out/$t" -instr-profile="$out/$t.profdata" $src
  done
done
