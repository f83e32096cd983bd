"""Registry of adapters, one per Hugging Face model_type."""

from edge_moe.errors import UnsupportedArchitecture
from edge_moe.model.adapters.base import Adapter
from edge_moe.model.adapters.mixtral import MixtralAdapter
from edge_moe.model.adapters.olmoe import OlmoeAdapter
from edge_moe.model.adapters.qwen2_moe import Qwen2MoeAdapter
from edge_moe.model.adapters.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    a.model_type: a for a in (Qwen3MoeAdapter, Qwen2MoeAdapter, OlmoeAdapter, MixtralAdapter)
}


def get_adapter(model_type: str | None) -> Adapter:
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]()
