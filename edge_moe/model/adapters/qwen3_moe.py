"""Qwen3-MoE. Differs from qwen2_moe: per-head q/k RMSNorm, no qkv bias, no shared expert."""

from edge_moe.config import ModelConfig
from edge_moe.model.adapters.base import Adapter, common_fields, num_experts, sparse_layers


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"

    def config(self, hf: dict) -> ModelConfig:
        return ModelConfig(
            model_type=self.model_type, **common_fields(hf),
            num_experts=num_experts(hf), top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            intermediate_size=hf.get("intermediate_size", 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            qk_norm="head", attention_bias=bool(hf.get("attention_bias", False)),
            moe_layers=sparse_layers(hf),
        )
