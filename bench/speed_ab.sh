#!/usr/bin/env bash
# Training speed at two commits in one device call (issue 21): bench/train_bench.py's sections at a base commit and
# at this tree, in the same process order on the same machine, so that a change between two sessions' numbers is
# told apart from the machine's spread (the recovery pieces of 2026-12-04 ran 43-55k tok/s on one command).
#
# Prepared here (CPU), the base's tree in an ignored folder (files only: a call carries no nested git):
#   C=a4f0d33~1; rm -rf runs/ab-base && mkdir -p runs/ab-base && git archive "$C" | tar -x --exclude="*.safetensors" -C runs/ab-base \
#     && git rev-parse "$C" > runs/ab-base/BASE_COMMIT
# Device calls, while the machine stays warm:
#   bash bench/recovery_gpu.sh install                    # carry [.whl, runs/carry-a]: wheels + this tree into /tmp/site
#   bash bench/speed_ab.sh                                # carry [runs/ab-base] -> $OUT/speed_{base,head}.json + .log
#
# SECTIONS (default trainer) and ARGS (more train_bench.py options) choose the rows; the base runs its own
# bench/train_bench.py against its own natsl_hf (installed to /tmp/site-base, ahead of /tmp/site's wheels).
set -euo pipefail
BASE=${BASE:-runs/ab-base}
SECTIONS=${SECTIONS:-trainer}
[ -f "$BASE/BASE_COMMIT" ] || { echo "no $BASE/BASE_COMMIT: prepare the base tree as the header says, carried with the call" >&2; exit 2; }
[ -d /tmp/site ] || { echo "no /tmp/site: run bash bench/recovery_gpu.sh install in this warm machine first" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site-base "./$BASE" 2>&1 | tail -3
echo "base: $(cat "$BASE/BASE_COMMIT") in $BASE; head: this tree" | tee "$OUT/speed_ab.txt"

bench_at() {  # TREE PYTHONPATH NAME: TREE's bench/train_bench.py with that natsl_hf -> $OUT/speed_NAME.json + .log
  # shellcheck disable=SC2086
  (cd "$1/bench" && PYTHONPATH=$2 python3 train_bench.py --sections "$SECTIONS" ${ARGS:-} \
    --out "$OUT/speed_$3.json" 2>&1 | tee "$OUT/speed_$3.log" | grep '"kind"' | tail -20)
}
bench_at "$BASE" /tmp/site-base:/tmp/site base
bench_at . /tmp/site head
