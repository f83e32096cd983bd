"""The .emoe container and the converter: corrupt, truncated and bad inputs give clear errors."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import edge_moe
from edge_moe.convert import convert
from edge_moe.convert.converter import NoTokenizerWarning
from edge_moe.errors import CheckpointError, FormatError, UnsupportedArchitecture, UsageError
from edge_moe.format.container import Container
from tests.model.tiny import save_tiny


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "hf"
    save_tiny("qwen3_moe", d)
    return d


@pytest.fixture()
def emoe(hf_dir, tmp_path):
    return convert(hf_dir, tmp_path / "m.emoe", group=64, progress=False)


def tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


def test_round_trip_manifest_and_expert_ranges(emoe):
    with Container(emoe) as c:
        m = c.manifest
        assert m["quant"]["scheme"] == "msb" and m["model"]["model_type"] == "qwen3_moe"
        off = m["experts"]["offsets"][0]
        assert all(o % 4096 == 0 for o in off)
        assert c.read_expert(0, 1, 3).nbytes == m["expert_layout"]["level_ends"][2]


def test_corrupted_expert_level_is_named(emoe):
    with Container(emoe) as c:
        where = c.data_offset + c.manifest["experts"]["offsets"][0][2] + c.expert_nbytes(2) + 5
    with open(emoe, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0xFF]))
    with Container(emoe) as c:
        c.read_expert(0, 2, 2)  # levels 1-2 are intact
        with pytest.raises(FormatError, match="expert 2 of layer 0, level 3"):
            c.read_expert(0, 2, 3)


def test_corrupted_dense_tensor_is_named(emoe):
    with Container(emoe) as c:
        where = c.data_offset + c.manifest["dense"]["layers.1.q"]["offset"]
    with open(emoe, "r+b") as f:
        f.seek(where)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(FormatError, match="tensor layers.1.q"):
        edge_moe.load(emoe)


def test_truncated_file_is_refused(emoe):
    size = emoe.stat().st_size
    os.truncate(emoe, size - 1000)
    with pytest.raises(FormatError, match="truncated"):
        Container(emoe)


def test_not_an_emoe_file(tmp_path):
    p = tmp_path / "x.emoe"
    p.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(FormatError, match="not an edge-moe model file"):
        Container(p)


def test_converter_never_touches_source_and_refuses_overwrite(hf_dir, tmp_path):
    before = tree_digest(hf_dir)
    out = convert(hf_dir, tmp_path / "a.emoe", group=64, progress=False)
    assert tree_digest(hf_dir) == before
    with pytest.raises(UsageError, match="--force"):
        convert(hf_dir, out, progress=False)
    convert(hf_dir, out, group=64, force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a.emoe"]  # no temporary left behind


def _edited_copy(hf_dir, tmp_path, edit):
    d = tmp_path / "edited"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")
    return d


def test_missing_tensor_is_named_and_nothing_written(hf_dir, tmp_path):
    src = _edited_copy(hf_dir, tmp_path, lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight is missing"):
        convert(src, tmp_path / "out.emoe", progress=False)
    assert not any(p.name.startswith(".out.emoe") or p.name == "out.emoe" for p in tmp_path.iterdir())


def test_misshapen_tensor_is_named(hf_dir, tmp_path):
    def shrink(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-1]
    src = _edited_copy(hf_dir, tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \[79, 160\], expected \[80, 160\]"):
        convert(src, tmp_path / "out.emoe", progress=False)


def test_integer_tensor_is_refused(hf_dir, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int8)
    src = _edited_copy(hf_dir, tmp_path, to_int)
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype I8"):
        convert(src, tmp_path / "out.emoe", progress=False)


def test_unknown_architecture(hf_dir, tmp_path):
    src = _edited_copy(hf_dir, tmp_path, lambda t: None)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama4_moe_x"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="'llama4_moe_x' is not supported; supported: mixtral"):
        convert(src, tmp_path / "out.emoe", progress=False)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(tmp_path, tmp_path.parent / "x.emoe", progress=False)


def test_direct_reads_land_the_same_bytes(tmp_path, monkeypatch):
    """With drop_page_cache, expert levels are read with O_DIRECT where offset and buffers are
    page-aligned (hidden 512 and expert width 512 make every chunk a page multiple, as real shapes do)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from edge_moe.format import container as container_module
    from edge_moe.runtime.arena import HostArena

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                        num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.emoe", progress=False)
    fds, real_preadv = [], os.preadv
    monkeypatch.setattr(container_module.os, "preadv",
                        lambda fd, bufs, pos: fds.append(fd) or real_preadv(fd, bufs, pos))
    with Container(path) as plain, Container(path, drop_page_cache=True) as direct:
        if direct._direct_fd is None:
            pytest.skip("this file system has no O_DIRECT")
        sizes = direct.manifest["expert_layout"]["chunk_sizes"]
        arena = HostArena(len(sizes), max(sizes))
        for expert in range(3):
            fds.clear()
            arena.load(direct, 0, expert, 0, len(sizes), list(range(len(sizes))), sizes, verify=True)
            assert fds == [direct._direct_fd]
            got = b"".join(arena.data[c, :n].tobytes() for c, n in enumerate(sizes))
            assert got == plain.read_expert(0, expert, len(sizes) - 1).tobytes()


@pytest.mark.parametrize("dst, group, message", [
    ("out.emoe", 7, "--group 7: the group size must be a positive multiple of 64"),
    ("missing/out.emoe", 64, "the folder .*missing does not exist"),
    (".", 64, "is a directory; give the output file's name"),
])
def test_bad_output_or_group_is_refused_before_writing(hf_dir, tmp_path, dst, group, message):
    with pytest.raises(UsageError, match=message):
        convert(hf_dir, tmp_path / dst, group=group, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_shard_is_named(hf_dir, tmp_path):
    src = _edited_copy(hf_dir, tmp_path, lambda t: None)
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read as safetensors .* complete"):
        convert(src, tmp_path / "out.emoe", progress=False)


def test_a_checkpoint_without_tokenizer_converts_with_a_warning(hf_dir, tmp_path):
    with pytest.warns(NoTokenizerWarning, match="no tokenizer.json: the model file will take token ids only"):
        convert(hf_dir, tmp_path / "out.emoe", group=64, progress=False)


def test_temporaries_of_dead_conversions_are_removed(hf_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".out.emoe.tmp-{dead}"
    live = tmp_path / f".out.emoe.tmp-{os.getppid()}"  # a running process's (pytest's parent)
    other = tmp_path / f".other.emoe.tmp-{dead}"  # another output's: not this conversion's to judge
    for p in (stale, live, other):
        p.write_bytes(b"x" * 100)
    convert(hf_dir, tmp_path / "out.emoe", group=64, progress=False)
    assert not stale.exists() and live.exists() and other.exists() and (tmp_path / "out.emoe").is_file()


def test_verify_all_reads_every_blob_and_names_a_flipped_byte(emoe):
    with Container(emoe) as c:
        assert c.verify_all() > 0.9 * c.data_bytes()
        expert_end = c.data_offset + c.manifest["experts"]["offsets"][0][1] + c.expert_nbytes(7)
    data = bytearray(emoe.read_bytes())
    data[expert_end - 10] ^= 1  # the last level of expert 1 of the first MoE layer
    emoe.write_bytes(bytes(data))
    with Container(emoe) as c, pytest.raises(FormatError, match="mismatch in expert 1 of layer 0, level 7"):
        c.verify_all()


def test_run_on_a_checkpoint_dir_says_convert_it(hf_dir):
    with pytest.raises(FormatError, match="is a directory, not an .emoe model file: .* `edge-moe convert"):
        edge_moe.load(hf_dir)
