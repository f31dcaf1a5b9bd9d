#!/usr/bin/env bash
# The working tree for one device call, which carries <= 64 MiB: the tracked safetensors (~77 MB in all) moved out of
# the tree, all but the folder the call reads (recovery_gpu.sh's RESUME), and bench/results (3.6 MB, which no device
# step reads: a quality call's tree, 5.8 MB + a 28.6 MB checkpoint, and its 33.0 MB of shards are 67.5 MB together,
# over the limit's 67.1). Run from the repo root, before each call:
#
#   bash bench/device_tree.sh none        # install / gguf / benchmarks: no checkpoint in the tree
#   bash bench/device_tree.sh recovered   # conversion/recovered/smollm2-135m-instruct-b0.25 (the shipped parameters)
#   bash bench/device_tree.sh b0.125      # bench/checkpoints/smollm2-135m-instruct-b0.125
#   bash bench/device_tree.sh restore     # every tracked file back (git checkout), after the calls
#
# The moved files go to $STASH (default ../stash-safetensors, beside the checkout); git restores them from its own
# objects, so the stash is only a convenience. Prints the bytes of the tracked files left (what a call carries besides
# its `carry` paths and the untracked files git does not ignore).
set -euo pipefail
STASH=${STASH:-../stash-safetensors}
case "${1:-}" in
  none) keep="" ;;
  recovered) keep=conversion/recovered/smollm2-135m-instruct-b0.25 ;;
  b0.125) keep=bench/checkpoints/smollm2-135m-instruct-b0.125 ;;
  restore) git checkout -- conversion/recovered bench/checkpoints bench/results && exit 0 ;;
  *) echo "usage: bash bench/device_tree.sh none|recovered|b0.125|restore" >&2; exit 2 ;;
esac
git checkout -- conversion/recovered bench/checkpoints bench/results
{ git ls-files -- '*.safetensors' | while read -r f; do [ "$(dirname "$f")" = "$keep" ] || echo "$f"; done
  git ls-files -- bench/results; } | while read -r f; do
  mkdir -p "$STASH/$(dirname "$f")" && mv "$f" "$STASH/$f"
done
git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1
