"""A small MoE with many experts, converted once, for the runtime tests."""

import pytest
import torch


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory):
    """qwen3_moe, 3 layers x 16 experts of 256x512: ~20 MB of experts at 8 bits, 56 KB chunks."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from edge_moe.convert import convert

    d = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=2,
                         moe_intermediate_size=512, intermediate_size=512, initializer_range=0.08,
                         max_position_embeddings=512, norm_topk_prob=True)
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d / "hf")
    return convert(d / "hf", d / "wide.emoe", progress=False)
