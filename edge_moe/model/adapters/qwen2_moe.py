"""Qwen1.5/2-MoE. Differs from qwen3_moe: q/k/v biases, no q/k norm, a shared expert with a sigmoid gate."""

from edge_moe.config import ModelConfig
from edge_moe.model.adapters.base import (
    LLAMA_STYLE_RULES,
    Adapter,
    common_fields,
    num_experts,
    sparse_layers,
)

_SHARED = "model.layers.{0}.mlp.shared_expert"


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"
    rules = {
        **LLAMA_STYLE_RULES,
        r"layers\.(\d+)\.shared_gate_up": [[_SHARED + ".gate_proj.weight", _SHARED + ".up_proj.weight"]],
        r"layers\.(\d+)\.shared_down": [[_SHARED + ".down_proj.weight"]],
        r"layers\.(\d+)\.shared_gate": [["model.layers.{0}.mlp.shared_expert_gate.weight"]],
    }

    def config(self, hf: dict) -> ModelConfig:
        return ModelConfig(
            model_type=self.model_type, **common_fields(hf),
            num_experts=num_experts(hf), top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            intermediate_size=hf.get("intermediate_size", 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            attention_bias=bool(hf.get("qkv_bias", True)),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
            shared_expert_gate=True, moe_layers=sparse_layers(hf),
        )
