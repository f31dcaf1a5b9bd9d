"""natsl-hf: NAtS-L token-routed softmax / Gated DeltaNet attention for Hugging Face Transformers.

`import natsl_hf` registers NatslConfig / NatslModel / NatslForCausalLM with AutoConfig,
AutoModel and AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(dir)` works for a
NAtS-L checkpoint; checkpoints saved by `save_pretrained` also carry an `auto_map` so they load
with `trust_remote_code=True` in a process that never imported natsl_hf.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import NatslCache, NatslStaticCache
from .configuration_natsl import NatslConfig
from .modeling_natsl import NatslForCausalLM, NatslModel, NatslPreTrainedModel

AutoConfig.register(NatslConfig.model_type, NatslConfig, exist_ok=True)
AutoModel.register(NatslConfig, NatslModel, exist_ok=True)
AutoModelForCausalLM.register(NatslConfig, NatslForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["NatslCache", "NatslStaticCache", "NatslConfig", "NatslForCausalLM", "NatslModel", "NatslPreTrainedModel"]
