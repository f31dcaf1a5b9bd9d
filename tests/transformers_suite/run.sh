#!/usr/bin/env bash
# Run transformers' common model + generation tests on NAtS-L (natsl_suite.py) inside a transformers test tree.
#   bash tests/transformers_suite/run.sh TREE [pytest args...]
# TREE: a directory holding transformers' `tests/` package (test_modeling_common.py, causal_lm_tester.py,
# generation/test_utils.py, ...), e.g. a checkout of github.com/huggingface/transformers at the installed
# release. Run inside the environment that has natsl_hf and transformers installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tree="$(cd "${1:?usage: run.sh TREE [pytest args]}" && pwd)"
shift
for f in tests/__init__.py tests/test_modeling_common.py tests/causal_lm_tester.py tests/generation/test_utils.py; do
  [ -f "$tree/$f" ] || { echo "run.sh: $tree/$f is missing: TREE must hold transformers' tests/ package" >&2; exit 2; }
done
# what transformers' test modules import beyond the library (its "testing" extra, the part these tests need)
python -c "import parameterized, httpx" 2>/dev/null || python -m pip install -q parameterized httpx
mkdir -p "$tree/tests/models/natsl"
touch "$tree/tests/models/__init__.py" "$tree/tests/models/natsl/__init__.py"
cp "$here/natsl_suite.py" "$tree/tests/models/natsl/test_modeling_natsl.py"
python -c "import transformers, natsl_hf; print('transformers', transformers.__version__, '| natsl_hf', natsl_hf.__version__)"
# the tree's tests/ package first on the path; transformers itself is the installed one. Then the caller's
# PYTHONPATH, its relative entries made absolute (pytest runs inside TREE), then this folder, so that
# `-p tree_defaults` loads the plugin beside this script without a PYTHONPATH.
path="$tree"
IFS=: read -r -a entries <<< "${PYTHONPATH:-}"
for entry in "${entries[@]}"; do
  [ -z "$entry" ] || path="$path:$(cd "$entry" 2>/dev/null && pwd || echo "$entry")"
done
path="$path:$here"
cd "$tree"
PYTHONPATH="$path" python -m pytest -q -p no:cacheprovider -rfE \
  tests/models/natsl/test_modeling_natsl.py "$@"
