"""Small qwen3_moe models with random weights, converted once, for the runtime tests."""

import pytest
import torch


def converted_qwen3(d, **config):
    """A qwen3_moe checkpoint of `config` (transformers' names) saved under d, converted to d/model.emoe."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from edge_moe.convert import convert

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts_per_tok=2,
                         **config)
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d / "hf")
    return convert(d / "hf", d / "model.emoe", progress=False)


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory):
    """3 layers x 16 experts of 256x512: ~20 MB of experts at 8 bits, 56 KB chunks."""
    return converted_qwen3(tmp_path_factory.mktemp("wide"), vocab_size=512, hidden_size=256,
                           num_hidden_layers=3, num_experts=16, moe_intermediate_size=512,
                           intermediate_size=512, initializer_range=0.08, max_position_embeddings=512,
                           norm_topk_prob=True)


@pytest.fixture(scope="session")
def big_vocab_model(tmp_path_factory):
    """A 32k vocabulary: 65 MB of bf16 embedding and LM head, a few MB of experts."""
    return converted_qwen3(tmp_path_factory.mktemp("vocab"), vocab_size=32000, hidden_size=512,
                           num_hidden_layers=2, num_experts=8, moe_intermediate_size=256,
                           intermediate_size=256, max_position_embeddings=256, tie_word_embeddings=False)
