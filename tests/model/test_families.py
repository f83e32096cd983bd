"""Every adapter against transformers' own forward on a tiny random checkpoint."""

import numpy as np
import pytest
import torch

import edge_moe
from edge_moe.convert import convert
from edge_moe.kernels import cpu
from edge_moe.kernels.reference import dequantized
from tests.model.tiny import FAMILIES, expert_modules, ref_greedy, ref_logits, save_tiny
from tests.tolerances import (
    DECODE_VS_PREFILL_REL,
    FORWARD_INT8_ACT_REL,
    FORWARD_SAME_WEIGHTS_REL,
    LOGITS_8BIT_REL,
)

PROMPT = [3, 17, 42, 99, 7, 250, 128, 5, 64, 31]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = save_tiny(request.param, d / "hf")
    out = convert(d / "hf", d / "model.emoe", scheme="msb", group=64, progress=False)
    model = edge_moe.load(out, dense_dtype=torch.float32, dense_bits=16)  # float32: compare forwards exactly
    yield request.param, ref, model
    model.close()


def load_dequantized_experts(ref, model, bits: int) -> None:
    """Put our b-bit dequantized expert weights into the transformers model (same weights, two forwards)."""
    for layer, mod in expert_modules(ref).items():
        for e in range(mod.gate_up_proj.shape[0]):
            buf = model.container.read_expert(layer, e, bits - 1)
            mod.gate_up_proj.data[e] = dequantized(model.layout, buf, "gate_up", bits)
            mod.down_proj.data[e] = dequantized(model.layout, buf, "down", bits)


def test_logits_8bit_close_to_transformers(family):
    _, ref, model = family
    err = rel_err(model.logits(PROMPT, bits=8), ref_logits(ref, PROMPT))
    assert err < LOGITS_8BIT_REL, err


def test_error_grows_as_bits_drop(family):
    _, ref, model = family
    want = ref_logits(ref, PROMPT)
    errs = [rel_err(model.logits(PROMPT, bits=b), want) for b in (8, 4, 2)]
    assert errs[0] < errs[1] < errs[2], errs


def test_forward_matches_transformers_on_same_weights_and_greedy_equal(family):
    _, ref, model = family
    load_dequantized_experts(ref, model, bits=8)
    err = rel_err(model.logits(PROMPT, bits=8), ref_logits(ref, PROMPT))
    assert err < FORWARD_SAME_WEIGHTS_REL, err
    ours = list(model.generate_ids(PROMPT, max_tokens=16, bits=8))
    assert ours == ref_greedy(ref, PROMPT, 16)


def test_forward_matches_transformers_on_int16_activations_below_8_bits(family):
    _, ref, model = family
    bits = cpu.ACT8_MAX_BITS + 1  # the lowest width whose kernels keep int16 activations
    load_dequantized_experts(ref, model, bits=bits)
    err = rel_err(model.logits(PROMPT, bits=bits), ref_logits(ref, PROMPT))
    assert err < FORWARD_SAME_WEIGHTS_REL, err


@pytest.mark.parametrize("bits", [3, cpu.ACT8_MAX_BITS])
def test_forward_on_int8_activations_exact_on_reference_ops_and_close_on_cpu(family, bits):
    """At <= ACT8_MAX_BITS the cpu kernels quantize expert inputs to int8 (their exact semantics are
    tested in tests/kernels): the forward on the reference ops matches transformers, the cpu one stays
    within the int8 tolerance."""
    _, ref, model = family
    load_dequantized_experts(ref, model, bits=bits)
    want = ref_logits(ref, PROMPT)
    with edge_moe.load(model.path, dense_dtype=torch.float32, dense_bits=16, backend="reference") as exact:
        assert rel_err(exact.logits(PROMPT, bits=bits), want) < FORWARD_SAME_WEIGHTS_REL
    assert rel_err(model.logits(PROMPT, bits=bits), want) < FORWARD_INT8_ACT_REL


def test_kv_cache_decode_matches_full_forward(family):
    _, _, model = family
    full = model.logits(PROMPT, bits=8)
    cache = model.decoder.new_cache(len(PROMPT))
    model.decoder.forward(PROMPT[:6], cache)
    steps = [model.decoder.forward([t], cache)[0] for t in PROMPT[6:]]
    assert rel_err(np.stack(steps), full[6:]) < DECODE_VS_PREFILL_REL


def test_torch_layers_match_host_layers(family):
    """The decoder on model.torch_layers (cuda's path), run here on cpu tensors over the same weights and
    experts, gives the logits of the host layers (numpy and numba, the cpu path)."""
    from edge_moe.model import torch_layers
    from edge_moe.model.decoder import Decoder
    from edge_moe.runtime.bit_policy import BitRequest
    from edge_moe.runtime.moe import Call

    _, _, model = family
    weights = {k: torch.from_numpy(v) for k, v in model.decoder.w.items()}
    on_torch = Decoder(model.config, weights, model.pipeline, torch_layers)
    got = on_torch.forward(PROMPT, torch_layers.KVCache(model.config, len(PROMPT), device="cpu"),
                           Call(BitRequest.make(bits=8)), all_logits=True)
    assert rel_err(got, model.logits(PROMPT, bits=8)) < FORWARD_SAME_WEIGHTS_REL
