"""Remote-code files for `trust_remote_code=True` loading of saved NAtS-L checkpoints.

Every checkpoint directory gets two small modules, `configuration_natsl.py` and
`modeling_natsl.py`, and its config carries an `auto_map` that points at them. They only
re-export the classes of the *installed* natsl_hf package (pip install natsl-hf): nothing else
is executed and nothing is fetched, and the model code itself is never duplicated into the
checkpoint, so a checkpoint cannot drift from the library that reads it.
"""

from __future__ import annotations

import os

AUTO_MAP = {
    "AutoConfig": "configuration_natsl.NatslConfig",
    "AutoModel": "modeling_natsl.NatslModel",
    "AutoModelForCausalLM": "modeling_natsl.NatslForCausalLM",
}

_FILES = {
    "configuration_natsl.py": (
        '"""NAtS-L configuration: re-exported from the installed natsl-hf package (pip install natsl-hf)."""\n\n'
        "from natsl_hf.configuration_natsl import NatslConfig\n\n"
        '__all__ = ["NatslConfig"]\n'
    ),
    "modeling_natsl.py": (
        '"""NAtS-L models: re-exported from the installed natsl-hf package (pip install natsl-hf)."""\n\n'
        "from natsl_hf.modeling_natsl import NatslForCausalLM, NatslModel, NatslPreTrainedModel\n\n"
        '__all__ = ["NatslForCausalLM", "NatslModel", "NatslPreTrainedModel"]\n'
    ),
}


def write_remote_code(save_directory: str | os.PathLike) -> list[str]:
    """Write the remote-code modules into `save_directory`; returns the file names written."""
    for name, text in _FILES.items():
        with open(os.path.join(save_directory, name), "w", encoding="utf-8") as f:
            f.write(text)
    return list(_FILES)
