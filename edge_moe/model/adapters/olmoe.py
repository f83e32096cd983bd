"""OLMoE. Differs from qwen3_moe: q/k RMSNorm over the whole projection (not per head), every layer MoE."""

from edge_moe.config import ModelConfig
from edge_moe.errors import UnsupportedArchitecture
from edge_moe.model.adapters.base import Adapter, common_fields, num_experts


class OlmoeAdapter(Adapter):
    model_type = "olmoe"

    def config(self, hf: dict) -> ModelConfig:
        if hf.get("clip_qkv") is not None:
            raise UnsupportedArchitecture("olmoe with clip_qkv set is not supported yet")
        fields = common_fields(hf)
        return ModelConfig(
            model_type=self.model_type, **fields,
            num_experts=num_experts(hf), top_k=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qk_norm="full", attention_bias=bool(hf.get("attention_bias", False)),
            moe_layers=tuple(range(fields["num_layers"])),
        )
