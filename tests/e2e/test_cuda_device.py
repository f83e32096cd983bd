"""--device cuda end to end on the demo model (GPU machine only): same greedy tokens as the CPU path."""

import pytest
import torch

import edge_moe

pytestmark = pytest.mark.cuda
PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def cpu_tokens():
    with edge_moe.load(dense_dtype=torch.float32, dense_bits=16) as m:  # the dense part as on cuda
        return {bits: list(m.generate_ids(m.encode(PROMPT), max_tokens=24, bits=bits)) for bits in (8, 4)}


@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_greedy_tokens_equal_cpu(cpu_tokens, bits):
    with edge_moe.load(device="cuda", dense_dtype=torch.float32) as m:
        assert list(m.generate_ids(m.encode(PROMPT), max_tokens=24, bits=bits)) == cpu_tokens[bits]


def test_cuda_under_a_vram_budget_streams_and_matches(cpu_tokens):
    # dense 7.4 MB (float32) + KV 4.2 MB + activations 1.7 MB + margin 33.6 MB leave ~1.4 MB of the
    # 7 MB of experts at 8 bits
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with edge_moe.load(device="cuda", dense_dtype=torch.float32, gpu_memory_budget="48.3MB") as m:
        assert m.cache.n_units < 4 * 8 * 8  # fewer units than the whole model: experts are streamed
        assert list(m.generate_ids(m.encode(PROMPT), max_tokens=24, bits=4)) == cpu_tokens[4]
        assert m.cache.evictions.sum() > 0
        assert torch.cuda.max_memory_allocated() - before <= 48.3e6


def test_cuda_refuses_a_vram_budget_too_small():
    with pytest.raises(edge_moe.errors.BudgetError, match="--gpu-memory-budget"):
        edge_moe.load(device="cuda", gpu_memory_budget="1MB")
