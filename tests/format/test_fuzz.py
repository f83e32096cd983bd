"""A fuzzed format: headers, manifest fields (re-checksummed, so the checks behind the checksum are
reached), blob bytes and file lengths of a small .emoe mutated at random. Every case must end in one of
edge-moe's typed errors or in the unmutated file's logits: never another exception, a crash or a hang.
EDGE_MOE_FUZZ_EXAMPLES sets the number of cases (default 60 here; thousands make a longer hunt)."""

import json
import os
import struct

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edge_moe  # noqa: E402
from edge_moe.convert import convert  # noqa: E402
from edge_moe.errors import EdgeMoeError  # noqa: E402
from edge_moe.format.container import HEADER  # noqa: E402
from tests.model.tiny import save_tiny  # noqa: E402

EXAMPLES = int(os.environ.get("EDGE_MOE_FUZZ_EXAMPLES", "60"))
IDS = [3, 17, 42, 5, 99, 7]


def logits(path) -> np.ndarray:
    with edge_moe.load(path, max_context=64) as m:
        return m.logits(IDS, bits=8)  # every level of each routed expert read and verified


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    save_tiny("qwen3_moe", d / "hf")
    path = convert(d / "hf", d / "m.emoe", group=64, progress=False)
    data = path.read_bytes()
    _, _, _, length, data_offset = HEADER.unpack(data[:HEADER.size])
    manifest = json.loads(data[HEADER.size:HEADER.size + length])
    return {"bytes": data, "manifest": manifest, "data_offset": data_offset, "logits": logits(path),
            "dir": d, "paths": list(_paths(manifest))}


def _paths(node, prefix=()):
    """Every key path of a JSON tree (lists of many items: their first two and last items only)."""
    if isinstance(node, dict):
        items = node.items()
    else:
        items = [(i, node[i]) for i in sorted({0, 1, len(node) - 1}) if 0 <= i < len(node)] \
            if isinstance(node, list) else []
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _with_manifest(orig: dict, manifest: dict) -> bytes | None:
    """The file with another manifest, checksum and length fixed up; None if it outgrows its room."""
    from edge_moe.format.container import MAGIC, VERSION, crc32

    text = json.dumps(manifest).encode()
    if HEADER.size + len(text) > orig["data_offset"]:
        return None
    head = HEADER.pack(MAGIC, VERSION, crc32(text) & 0xFFFFFFFF, len(text), orig["data_offset"])
    body = text + b" " * (orig["data_offset"] - HEADER.size - len(text))
    return head + body + orig["bytes"][orig["data_offset"]:]


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                 st.sampled_from([0, -1, 1, 2**31, 2**64]), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


# config fields any of whose values of the right type is a valid (other) model: only wrong values are drawn
# for them, since a fixed-up checksum is the fuzzer's doing and a changed model is not an error
BAD_FLOAT = st.sampled_from([None, "1e-6", -1.0, 0, float("nan"), float("inf"), [1.0], True])
BAD_BOOL = st.sampled_from([None, 0, 1, "true", [], 2.5])
FREE = {("model", "rope_theta"): BAD_FLOAT, ("model", "rms_norm_eps"): BAD_FLOAT,
        ("model", "norm_topk_prob"): BAD_BOOL}


@st.composite
def mutation(draw, orig_paths):
    kind = draw(st.sampled_from(["header", "field", "delete", "data", "truncate"]))
    if kind == "header":
        return kind, draw(st.integers(0, HEADER.size - 1)), draw(st.integers(0, 255))
    if kind in ("field", "delete"):
        path = draw(st.sampled_from(orig_paths))
        return kind, path, draw(FREE.get(path, JUNK))
    if kind == "data":
        return kind, draw(st.integers(0, 2**31)), draw(st.integers(1, 255))
    return kind, draw(st.integers(0, 2**31)), None


def mutate(orig: dict, m) -> bytes | None:
    kind, where, value = m
    data = bytearray(orig["bytes"])
    if kind == "header":
        data[where] = value
    elif kind == "data":
        data[orig["data_offset"] + where % (len(data) - orig["data_offset"])] ^= value
    elif kind == "truncate":
        del data[where % len(data):]
    else:
        manifest = json.loads(json.dumps(orig["manifest"]))
        node = manifest
        for key in where[:-1]:
            node = node[key]
        if kind == "delete" and isinstance(node, dict):
            del node[where[-1]]
        else:
            node[where[-1]] = value
        return _with_manifest(orig, manifest)
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_file_gives_a_typed_error_or_the_same_logits(original, data):
    m = data.draw(mutation(original["paths"]))
    mutated = mutate(original, m)
    hypothesis.assume(mutated is not None)
    path = original["dir"] / "mutated.emoe"
    path.write_bytes(mutated)
    try:
        out = logits(path)
    except EdgeMoeError:
        return
    assert np.array_equal(out, original["logits"]), m


def test_the_fuzzer_reaches_the_manifest_checks(original):
    """A manifest mutation that only its own checks can catch (the checksum is fixed up)."""
    manifest = json.loads(json.dumps(original["manifest"]))
    name = next(iter(manifest["dense"]))
    manifest["dense"][name]["nbytes"] = 2**62
    path = original["dir"] / "big.emoe"
    path.write_bytes(_with_manifest(original, manifest))
    with pytest.raises(EdgeMoeError, match=f"manifest field dense.{name}.nbytes"):
        logits(path)
    assert struct.unpack("<I", original["bytes"][8:12])[0] == 1  # the format version the fuzzer writes
