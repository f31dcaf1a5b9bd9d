"""pytest plugin for running a transformers test tree newer than the installed release (run.sh ... -p tree_defaults).

A newer tree's helper modules may import module-level constants of `transformers.testing_utils` that the installed
release does not define yet (the 2b296305d7 tree: `_TEXT_MODEL_TESTER_DEFAULTS`, missing from 5.24.0). This reads
the tree's own `src/transformers/testing_utils.py` (its path in $NATSL_TF_SRC, the source checkout given to
make_tree.sh) and sets on the installed module every top-level constant it lacks that is a plain literal; nothing
the installed release defines is changed. The pytest header lists what was added.

The same for one method: that tree's export tests (`tests/exporters/test_export.py`, RUN_SLOW=1) run what
`DynamoExporter.export` returns as `.module()(**inputs)`, a torch ExportedProgram there; the 5.2x releases return
an `ExportedModel`, which is called directly and has no `module`. It gets one that returns itself.
"""

import ast
import os
from pathlib import Path

import transformers.testing_utils as installed

_SOURCE = Path(os.environ.get("NATSL_TF_SRC", "."), "src", "transformers", "testing_utils.py")
ADDED = []
if _SOURCE.is_file():
    for node in ast.parse(_SOURCE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if hasattr(installed, name):
                continue
            try:
                setattr(installed, name, ast.literal_eval(node.value))
            except ValueError:  # not a literal: leave it out
                continue
            ADDED.append(name)


try:
    from transformers.exporters.base import ExportedModel
except ImportError:  # a release without transformers.exporters: the export tests do not import either
    ExportedModel = None
if ExportedModel is not None and not hasattr(ExportedModel, "module"):
    ExportedModel.module = lambda self: self
    ADDED.append("ExportedModel.module")


def pytest_report_header(config):
    return f"tree_defaults: from {_SOURCE}: {', '.join(ADDED) or 'nothing added'}"
