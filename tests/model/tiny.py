"""Tiny random Hugging Face MoE checkpoints built with transformers inside the tests (no downloads)."""

from __future__ import annotations

import torch

# Odd sizes on purpose: hidden 160 = 2.5 groups of 64, expert width 96 = 1.5 groups.
COMMON = dict(vocab_size=256, hidden_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=40, max_position_embeddings=256, rms_norm_eps=1e-6,
              initializer_range=0.08, tie_word_embeddings=False)


def tiny_config(model_type: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    moe = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=96)
    if model_type == "qwen3_moe":  # layer 1 dense: exercises mlp_only_layers
        return Qwen3MoeConfig(**COMMON, **moe, intermediate_size=128, mlp_only_layers=[1],
                              norm_topk_prob=True, rope_theta=10000.0)
    if model_type == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, **moe, intermediate_size=128, shared_expert_intermediate_size=112,
                              norm_topk_prob=False)
    if model_type == "olmoe":
        return OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, num_experts=6, num_experts_per_tok=2,
                           intermediate_size=96)
    if model_type == "mixtral":
        return MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2, intermediate_size=96,
                             rope_theta=1e6)
    raise ValueError(model_type)


FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")


def save_tiny(model_type: str, path, seed: int = 0):
    """Save a bf16 checkpoint (as on the hub) and return the float32 reference model loaded from it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.to(torch.bfloat16).save_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ref.eval()


def expert_modules(model):
    """Per layer, the module holding fused expert tensors gate_up_proj [E, 2I, D], down_proj [E, D, I]."""
    found = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "gate_up_proj", None), torch.nn.Parameter):
            found[int(name.split("layers.")[1].split(".")[0])] = mod
    return found


@torch.no_grad()
def ref_logits(model, ids) -> torch.Tensor:
    return model(torch.as_tensor([ids])).logits[0].float()


@torch.no_grad()
def ref_greedy(model, ids, n: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        token = int(ref_logits(model, ids)[-1].argmax())
        ids.append(token)
        out.append(token)
    return out
