"""transformers' common model and generation tests (ModelTesterMixin + GenerationTesterMixin through
CausalLMModelTest) on a tiny NAtS-L model, as `tests/models/natsl/test_modeling_natsl.py` of a transformers
test tree. Not collected by this repo's pytest run: `run.sh` (beside this file) copies it into such a tree
and runs it; README.md here says which trees work.

What is NAtS-L's own here, as transformers' hybrid models (Mamba, Jamba, Qwen3.5...) declare theirs:
- `has_attentions = False`: the model refuses `output_attentions=True` with an error naming the fix (there is
  no attention matrix: the softmax branch runs fused over the kept chunks, the GDN branch is a state).
- `_check_past_key_values_for_generate`: the cache is a NatslCache (a DynamicCache) or a NatslStaticCache (a
  StaticCache) whose layers hold a NAtS-L state, not one dense key/value tensor of every token; it checks
  that state's shapes and lengths instead (also what `test_past_key_values_format` calls).
- `test_generate_compilation_all_outputs`: transformers' version asks for attentions whatever
  `has_attentions` says; this one asks for every other output under the same automatic compilation.
- `test_left_padding_compatibility`: transformers skips it for models without attentions; it runs here.
"""

import unittest

import torch
from transformers import CompileConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import torch_device

from natsl_hf import NatslCache, NatslConfig, NatslForCausalLM, NatslModel, NatslStaticCache

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester

# in-tree models are listed in these name maps; the common tests pick labels / skip base models by them
MODEL_MAPPING_NAMES.setdefault("natsl", "NatslModel")
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("natsl", "NatslForCausalLM")


class NatslModelTester(CausalLMModelTester):
    config_class = NatslConfig
    base_model_class = NatslModel
    causal_lm_class = NatslForCausalLM

    def get_config(self):
        config = super().get_config()
        config.update({"chunk_size": 2, "router_init_bias": 0.0})  # chunks of 2 tokens, routers start undecided
        return config


class NatslModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = NatslModelTester
    pipeline_model_mapping = {}
    has_attentions = False

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        cache = past_key_values
        self.assertIsInstance(cache, (NatslCache, NatslStaticCache))
        self.assertEqual(len(cache), config.num_hidden_layers)
        self.assertEqual(int(cache.get_seq_length()), seq_length)  # columns, padding included
        hkv, d, chunk = config.num_key_value_heads, config.head_dim, config.chunk_size
        for idx, layer in enumerate(cache.layers):
            state = layer.state
            # real tokens per row: at most the columns, and the kept softmax KV at most those
            self.assertEqual(tuple(state.seen.shape), (batch_size,))
            self.assertTrue(bool((state.seen <= seq_length).all()) and bool((state.seen > 0).all()))
            self.assertEqual(tuple(state.kept_k.shape[:2]) + tuple(state.kept_k.shape[3:]), (batch_size, hkv, d))
            self.assertEqual(state.kept_v.shape[:2], state.kept_k.shape[:2])
            self.assertTrue(bool((state.kept_len <= state.seen[:, None]).all()))
            self.assertEqual(tuple(state.open_k.shape), (batch_size, chunk, hkv, d))
            if config.is_natsl_layer(idx):  # the GDN branch's state: one [K, V] matrix per row and KV head
                self.assertEqual(tuple(state.gdn_state.shape), (batch_size, hkv, d, d))
                self.assertEqual(tuple(state.router_sum.shape), (batch_size, config.hidden_size))
                self.assertEqual(state.conv_state.shape[:2], (batch_size, config.gdn_conv_size - 1))
            else:  # a full-softmax layer keeps every token
                self.assertIsNone(state.gdn_state)
                self.assertTrue(bool((state.kept_len + state.seen[:, None] % chunk == state.seen[:, None]).all()))

    def test_left_padding_compatibility(self, *args, **kwargs):
        # transformers skips it when `has_attentions` is False; NAtS-L takes left padding (a padded row computes what
        # it computes alone), so the test runs as written, with attentions never asked for
        self.has_attentions = True
        try:
            super().test_left_padding_compatibility(*args, **kwargs)
        finally:
            self.has_attentions = False

    def test_generate_compilation_all_outputs(self):
        config, inputs_dict = self.prepare_config_and_inputs_for_generate()
        model = NatslForCausalLM(config).to(torch_device).eval()
        torch.compiler.reset()
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # compile on the CPU too
        model.generation_config.compile_config = compile_config
        model.generation_config.cache_implementation = "static"
        out = model.generate(
            do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens,
            output_hidden_states=True, output_scores=True, output_logits=True, return_dict_in_generate=True,
            use_cache=True, **inputs_dict,
        )
        self.assertTrue(hasattr(model, "_compiled_call"))  # the automatic compilation ran
        prompt = inputs_dict["input_ids"].shape[1]
        self.assertEqual(out.sequences.shape[1], prompt + self.max_new_tokens)
        self._check_generate_outputs(out, model.config, use_cache=True)
