"""Mixtral. Differs from olmoe: no q/k norm, renormalized top-k, hub names block_sparse_moe.w1/w3/w2."""

from edge_moe.config import ModelConfig
from edge_moe.model.adapters.base import (
    FUSED_EXPERTS,
    LLAMA_STYLE_RULES,
    Adapter,
    common_fields,
    num_experts,
)

_MOE = "model.layers.{layer}.block_sparse_moe.experts.{expert}"


class MixtralAdapter(Adapter):
    model_type = "mixtral"
    rules = {**LLAMA_STYLE_RULES,
             r"layers\.(\d+)\.router": [["model.layers.{0}.block_sparse_moe.gate.weight"],
                                        ["model.layers.{0}.mlp.gate.weight"]]}
    per_expert = {"gate": _MOE + ".w1.weight", "up": _MOE + ".w3.weight", "down": _MOE + ".w2.weight"}
    fused_experts = FUSED_EXPERTS

    def config(self, hf: dict) -> ModelConfig:
        fields = common_fields(hf)
        return ModelConfig(
            model_type=self.model_type, **fields,
            num_experts=num_experts(hf), top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True,
            moe_layers=tuple(range(fields["num_layers"])),
        )
