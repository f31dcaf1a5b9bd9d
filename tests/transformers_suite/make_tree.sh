#!/usr/bin/env bash
# Assemble a transformers test tree for run.sh from what can be had offline of a release:
#   bash tests/transformers_suite/make_tree.sh SOURCE OUT
# SOURCE: a transformers source tree (a git checkout; its tests/ supplies what the PyPI sdist leaves out:
#         tests/__init__.py, causal_lm_tester.py, generation/, utils/ ..., and the top-level utils/, which
#         some test modules import).
# OUT:    the tree to create. Its top-level tests/*.py (test_modeling_common.py, the mixins) come from the
#         sdist of the installed transformers release (pip download), so the common tests match the library.
set -euo pipefail
source_tree="$(cd "${1:?usage: make_tree.sh SOURCE OUT}" && pwd)"
out="${2:?usage: make_tree.sh SOURCE OUT}"
[ -f "$source_tree/tests/generation/test_utils.py" ] || { echo "make_tree.sh: $source_tree has no tests/generation/test_utils.py" >&2; exit 2; }
[ ! -e "$out" ] || { echo "make_tree.sh: $out exists; give a new directory" >&2; exit 2; }
version="$(python -c 'import transformers; print(transformers.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --no-binary :all: -d "$work" "transformers==$version"
tar -xzf "$work/transformers-$version.tar.gz" -C "$work"
mkdir -p "$out"
cp -r "$source_tree/tests" "$out/tests"
[ ! -d "$source_tree/utils" ] || cp -r "$source_tree/utils" "$out/utils"  # test_module/, fetch_hub_objects_for_ci.py
rm -rf "$out/tests/models"
mkdir -p "$out/tests/models"
touch "$out/tests/models/__init__.py"
cp "$work/transformers-$version/tests/"*.py "$out/tests/"  # the release's common tests over the source tree's
# tests/test_pipeline_mixin.py reads the library's sources from src/transformers: the installed package
mkdir -p "$out/src"
ln -s "$(python -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')" "$out/src/transformers"
# Two modules the common tests import are in neither the sdist nor every source tree: stand-ins (marked as such)
# where missing. ExportTesterMixin's torch.export tests then do not run; the multi-process ones skip.
if [ ! -f "$out/tests/exporters/test_export.py" ]; then
  mkdir -p "$out/tests/exporters"
  touch "$out/tests/exporters/__init__.py"
  printf '%s\n' "# STAND-IN written by natsl-hf make_tree.sh: transformers' exporters tests were not available." \
    "class ExportTesterMixin:" "    pass" > "$out/tests/exporters/test_export.py"
fi
if [ ! -f "$out/tests/distributed_testing_utils.py" ]; then
  cat > "$out/tests/distributed_testing_utils.py" <<'PY'
# STAND-IN written by natsl-hf make_tree.sh: transformers' distributed_testing_utils.py was not available;
# the multi-process tests that use it skip.
import unittest


def _skip(*args, **kwargs):
    raise unittest.SkipTest("multi-process test: tests/distributed_testing_utils.py is a stand-in")


run_distributed = _get_distributed_backend = _get_distributed_device_type = _skip
_get_rank_device = _set_rank_device = _start_rank_processes = _skip
PY
fi
echo "test tree in $out: tests/*.py from the transformers $version sdist, the rest from $source_tree"
