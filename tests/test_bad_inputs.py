"""Bad inputs a new user tries (issue 17): each is refused with one line that names the fix, and leaves
nothing behind. CLI errors are `PROG: error: ...` on stderr with exit status 2, as argparse gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from natsl_hf import NatslConfig, NatslForCausalLM
from natsl_hf.conversion.convert import main as convert_main
from natsl_testing import tiny_config

BAD_FIELDS = [
    ("route_override", "foo", "expected None, 'softmax' or 'linear'"),
    ("chunk_size", 3, "expected a power of two"),
    ("softmax_budget", 5.0, r"expected a fraction in \[0, 1\]"),
    ("softmax_budget", True, r"expected a fraction in \[0, 1\]"),
    ("natsl_layers", [0, 9], r"layer indices must lie in \[0, 1\]"),
    ("chunk_size", 4096, "no chunk could ever be routed; use chunk_size <= 2048"),
]


def one_line_error(text: str, prog: str) -> str:
    """The error a CLI printed: exactly one line `PROG: error: ...`, no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), text
    return lines[0]


def tiny_llama(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- NatslConfig
@pytest.mark.parametrize("field,value,allowed", BAD_FIELDS)
def test_every_way_of_setting_a_field_is_validated(field, value, allowed, tmp_path):
    tiny_config().save_pretrained(tmp_path)
    message = rf"NatslConfig\.{field}=.* is invalid: .*{allowed}"
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})
    with pytest.raises(ValueError, match=message):
        NatslConfig.from_pretrained(tmp_path, **{field: value})
    config = tiny_config()
    before = config.to_dict()
    with pytest.raises(ValueError, match=message):
        setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.update({"softmax_budget": 0.5, field: value})
    assert config.to_dict() == before  # a rejected assignment or update changes nothing


def test_model_from_pretrained_validates_its_config_kwargs(tmp_path):
    torch.manual_seed(0)
    NatslForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="route_override='foo' is invalid"):
        NatslForCausalLM.from_pretrained(tmp_path, route_override="foo")


def test_an_update_is_validated_as_a_whole():
    config = tiny_config(num_hidden_layers=4, natsl_layers=[1, 3])
    config.update({"num_hidden_layers": 2, "natsl_layers": [1]})  # invalid only midway
    assert (config.num_hidden_layers, config.natsl_layers) == (2, [1])
    config.natsl_layers = [1, 0, 1]
    assert config.natsl_layers == [0, 1]
    assert "_natsl_validated" not in config.to_json_string()
