"""natsl-hf: NAtS-L token-routed softmax / Gated DeltaNet attention for Hugging Face Transformers.

`import natsl_hf` registers NatslConfig / NatslModel / NatslForCausalLM with AutoConfig,
AutoModel and AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(dir)` works for a
NAtS-L checkpoint; checkpoints saved by `save_pretrained` also carry an `auto_map` so they load
with `trust_remote_code=True` in a process that has natsl_hf installed but never imported it.

One exception keeps the command lines quick to start (`--help` and a usage error answer before torch
or transformers is imported): in a process started as one of natsl-hf's own commands (natsl-convert,
natsl-distill, natsl-inspect, natsl-hub, or `python -m` one of their modules) the classes are imported,
and registered, on first use of any public name here (`natsl_hf.NatslForCausalLM`, ...) or by
`natsl_hf._load()`, which those commands call before they touch an Auto class.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"
__all__ = ["NatslCache", "NatslStaticCache", "NatslConfig", "NatslForCausalLM", "NatslModel", "NatslPreTrainedModel"]

# the console scripts of setup.py and the modules behind them
_CLI_PROGS = ("natsl-convert", "natsl-calibrate", "natsl-distill", "natsl-inspect", "natsl-hub")
_CLI_MODULES = ("natsl_hf.conversion.convert", "natsl_hf.conversion.calibrate", "natsl_hf.conversion.distill",
                "natsl_hf.conversion.smollm2", "natsl_hf.inspect", "natsl_hf.hub")


def _started_as_cli() -> bool:
    """Whether this process is a natsl-hf command line: a console script of setup.py, or `python -m` a module of
    one (`sys.orig_argv`; `sys.argv[0]` is still "-m" while the parent package is imported)."""
    prog = _os.path.basename(_sys.argv[0]) if _sys.argv and _sys.argv[0] else ""
    for suffix in ("-script.pyw", "-script.py", ".exe"):  # Windows launchers
        if prog.endswith(suffix):
            prog = prog[: -len(suffix)]
    if prog in _CLI_PROGS:
        return True
    argv = getattr(_sys, "orig_argv", [])
    return any(flag == "-m" and module in _CLI_MODULES for flag, module in zip(argv, argv[1:]))


def _load() -> None:
    """Import the classes and register them with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .cache import NatslCache, NatslStaticCache
    from .configuration_natsl import NatslConfig
    from .modeling_natsl import NatslForCausalLM, NatslModel, NatslPreTrainedModel

    AutoConfig.register(NatslConfig.model_type, NatslConfig, exist_ok=True)
    AutoModel.register(NatslConfig, NatslModel, exist_ok=True)
    AutoModelForCausalLM.register(NatslConfig, NatslForCausalLM, exist_ok=True)
    globals().update(NatslCache=NatslCache, NatslStaticCache=NatslStaticCache, NatslConfig=NatslConfig,
                     NatslForCausalLM=NatslForCausalLM, NatslModel=NatslModel,
                     NatslPreTrainedModel=NatslPreTrainedModel)


def __getattr__(name: str):
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not _started_as_cli():
    _load()
