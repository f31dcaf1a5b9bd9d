#!/usr/bin/env bash
# The device calls of one recovery session (issue 22), one step per call, run from the repo root on the
# GPU machine while it stays warm (it keeps /tmp for ~30 s of idleness between calls):
#
#   bash bench/recovery_gpu.sh install   # carry [.whl, runs/carry-a]: wheels + this tree into /tmp/site, GGUF part 1
#   bash bench/recovery_gpu.sh gguf      # carry [runs/carry-b]: GGUF part 2, joined and checked
#   bash bench/recovery_gpu.sh data      # carry [runs/recovery-data]: the shards to /tmp/rd (a stage 2 without stage 1)
#   bash bench/recovery_gpu.sh stage1    # carry [runs/recovery-data]: the shards to /tmp/rd, stage 1 piece -> $OUT/ckpt1
#   bash bench/recovery_gpu.sh stage2    # stage 2 piece from stage 1's checkpoint -> $OUT/ckpt2, $OUT/stage2.log
#                                        # (RESUME=conversion/recovered/smollm2-135m-instruct-b0.25: go on from the
#                                        # shipped parameters (102M tokens, 2026-12-06), carried in the tree of that
#                                        # call; a later piece of the same session goes on with RESUME=/tmp/rw2/ckpt,
#                                        # the last piece's)
#   bash bench/recovery_gpu.sh piece     # stage2, then eval of its checkpoint, in one call: $OUT gets the 8 files a call
#                                        # brings back (ship/ (4), progress.json, stage2.log, quality.json, quality.log);
#                                        # the fp32 checkpoint stays in /tmp/rw2/ckpt for a later piece's RESUME
#   bash bench/recovery_gpu.sh refit     # RESUME's routers fitted again on a recall-rich fit set, calibrated, no training
#                                        # -> /tmp/rw0/ckpt (+ $OUT/refit): evaluate it with EVAL_CKPT=/tmp/rw0/ckpt, go on
#                                        # from it with RESUME=/tmp/rw0/ckpt
#   bash bench/recovery_gpu.sh recalibrate  # the same without the fit: RESUME's router biases set again (RECAL_ARGS, by
#                                        # default as piece 12's: 64 x 2048, recall 0.2), no training -> /tmp/rw0/ckpt
#   bash bench/recovery_gpu.sh eval      # export EVAL_CKPT (default /tmp/rw2/ckpt, the last stage-2 piece's) as the shipped
#                                        # layout -> $OUT/ship, bench/eval_quality.py -> $OUT/quality.*
#   bash bench/recovery_gpu.sh compare   # COMPARE="LABEL=FOLDER ..." (shipped layouts, carried): all of them and the source
#                                        # in one bench/eval_quality.py run -> $OUT/quality.* (the heldout text in /tmp/rd)
#
# Prepared here (CPU): `python bench/build_recovery_data.py --with-code` (runs/recovery-data), the GGUF split in
# two (`split -n 2 -d GGUF runs/carry-x.` -> runs/carry-a/gguf.00, runs/carry-b/gguf.01), the wheels the GPU image
# lacks in .whl/ (flash-linear-attention, fla-core 0.6.0, peft, gguf), and before each call the tree that call carries
# (<= 64 MiB: `bash bench/device_tree.sh none|recovered|b0.125`, `restore` after). STAGE1_ARGS / STAGE2_ARGS /
# EVAL_ARGS override the recipe below.
set -euo pipefail
G=/tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:/tmp/shim
STAGE1_ARGS=${STAGE1_ARGS:---minutes 5 --max-steps 624 --recall-share 0.2 --layer-budgets}
STAGE2_ARGS=${STAGE2_ARGS:---minutes 8 --recall-share 0.2 --lm-weight 0.25}  # KD-weighted since piece 6 (RECOVERY_NOTES)
REFIT_ARGS=${REFIT_ARGS:---fit-recall-share 0.5 --fit-blocks 256}
# at the evaluated length, as the shipped piece 12 was (a recall-rich set, --calibration-recall-share 0.5, brought the
# 2k key-value contexts to 0.30 on the CPU but cost the 4k lookups: RECOVERY_NOTES 2026-12-08)
RECAL_ARGS=${RECAL_ARGS:---calibration-seq-len 2048 --calibration-blocks 64 --calibration-recall-share 0.2 --varied-recall}
RESUME=${RESUME:-/tmp/rw1/ckpt}
EVAL_CKPT=${EVAL_CKPT:-/tmp/rw2/ckpt}
copy_data() { rm -rf /tmp/rd && cp -r runs/recovery-data /tmp/rd; }  # the carried shards, where the pieces read them
case "$1" in
  install)
    mkdir -p /tmp/g /tmp/shim && cp runs/carry-a/gguf.00 /tmp/g/
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . 2>&1 | tail -3
    # the GPU image has no `datasets`; bench/eval_quality.py only needs Dataset.from_dict to hand its dict on
    printf 'class Dataset:\n    from_dict = staticmethod(lambda d: d)\n' > /tmp/shim/datasets.py
    (cd /tmp && python3 -c "import natsl_hf, fla, peft, gguf, torch, transformers, triton; print('ok', torch.__version__, transformers.__version__, triton.__version__, fla.__version__, torch.cuda.get_device_name())")
    ;;
  gguf)
    cat /tmp/g/gguf.00 runs/carry-b/gguf.01 > "$G" && rm /tmp/g/gguf.00
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c
    ;;
  data)
    copy_data && du -sh /tmp/rd
    ;;
  stage1)
    copy_data
    # shellcheck disable=SC2086
    TORCH_LOGS=recompiles python3 bench/recover_scale.py --stage 1 $STAGE1_ARGS --gguf "$G" --data /tmp/rd \
      --work /tmp/rw1 --out "$OUT/ckpt1" 2>&1 | tee "$OUT/stage1.log" | grep -v "it/s\]" | tail -40
    ;;
  stage2)
    # shellcheck disable=SC2086
    TORCH_LOGS=recompiles python3 bench/recover_scale.py --stage 2 $STAGE2_ARGS --gguf "$G" --data /tmp/rd \
      --work /tmp/rw2 --resume "$RESUME" --out "${CKPT_OUT:-$OUT/ckpt2}" 2>&1 | tee "$OUT/stage2.log" | grep -v "it/s\]" | tail -40
    ;;
  piece)
    CKPT_OUT=/tmp/rw2/ckpt bash "$0" stage2 && cp /tmp/rw2/ckpt/progress.json "$OUT/progress.json" && bash "$0" eval
    ;;
  refit|recalibrate)
    if [ "$1" = refit ]; then ARGS="--refit-routers $REFIT_ARGS"; else ARGS=$RECAL_ARGS; fi
    # shellcheck disable=SC2086
    python3 bench/recover_scale.py --recalibrate "$RESUME" $ARGS --gguf "$G" --data /tmp/rd \
      --out /tmp/rw0/ckpt 2>&1 | tee "$OUT/$1.log" | grep -v "it/s\]" | tail -20
    cp /tmp/rw0/ckpt/progress.json "$OUT/$1_progress.json"
    ;;
  eval)
    python3 bench/recover_scale.py --export "$EVAL_CKPT" --to "$OUT/ship"
    COMPARE="natsl=$OUT/ship" bash "$0" compare
    ;;
  compare)  # COMPARE="LABEL=FOLDER ...": shipped-layout checkpoints, evaluated side by side with the source in one run
    # shellcheck disable=SC2086
    python3 bench/recover_scale.py --materialize $COMPARE --gguf "$G" --to /tmp/mat
    models=()
    for m in $COMPARE; do models+=(--model "${m%%=*}=/tmp/mat/${m%%=*}"); done
    # shellcheck disable=SC2086
    python3 bench/eval_quality.py --source /tmp/mat/source "${models[@]}" --text /tmp/rd/heldout.txt \
      ${EVAL_ARGS:---seq-len 2048 --ppl-blocks 16 --gen-prompts 32 --gen-tokens 32 --retrieval-lengths 2048 4096 \
      --retrieval-contexts 16 --retrieval-queries 8 --needle-contexts 128 --passkey-contexts 128 --chat-prompts 128 \
      --chat-text conversion/texts/heldout_wikipedia.txt --batch-size 8 --dtype bfloat16} \
      --prose-text conversion/texts/heldout_wikipedia.txt --prose-blocks 4 \
      --out "$OUT/quality.json" 2>&1 | tee "$OUT/quality.log" | grep -v "it/s\]" | tail -60
    ;;
  *) echo "usage: bash bench/recovery_gpu.sh install|gguf|data|stage1|stage2|piece|refit|recalibrate|eval|compare" >&2; exit 2 ;;
esac
