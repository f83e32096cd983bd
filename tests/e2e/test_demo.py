"""CLI and API end to end on the demo model shipped inside the package."""

import subprocess
import sys

import numpy as np
import pytest

import edge_moe
from edge_moe.api import DEMO_MODEL
from edge_moe.errors import UsageError

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo model not built into the package")
PROMPT = "def main():\n    "


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_moe.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def model():
    m = edge_moe.load()
    yield m
    m.close()


def test_cli_run_streams_text_on_the_demo_model():
    r = cli("run", "--prompt", PROMPT, "--max-tokens", "12", "--memory-budget", "6GB", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT) and len(r.stdout.strip()) > len(PROMPT.strip())
    assert "memory plan for budget 6.00 GB" in r.stderr and "decode_tokens_per_s" in r.stderr
    peak = next(line for line in r.stderr.splitlines() if line.startswith("peak_rss:"))
    assert float(peak.split()[1]) < 6000 and peak.endswith("MB")  # the process stayed far under 6 GB


def test_cli_refuses_a_budget_below_the_minimum():
    r = cli("run", "--prompt", "x", "--memory-budget", "100MB")
    assert r.returncode == 2 and "budget 100.00 MB is below the" in r.stderr and "--memory-budget" in r.stderr


def test_cli_inspect():
    r = cli("inspect")
    assert r.returncode == 0, r.stderr
    assert "qwen3_moe" in r.stdout and "8 bits: experts" in r.stdout


@pytest.mark.parametrize("args, message", [
    (("run", "--prompt", "x", "--bits", "9"), "bits=9 is out of range; choose 2..8"),
    (("run", "--prompt", "x", "--memory-budget", "6XB"), "cannot read size '6XB'"),
    (("run", "missing.emoe", "--prompt", "x"), "cannot open model file missing.emoe"),
    (("inspect", "README.md"), "not an edge-moe model file"),
    (("run", "--prompt", "x", "--max-tokens", "-1"), "--max-tokens -1: use 0 or more"),
    (("run", "--prompt", "x", "--top-p", "0"), "--top-p 0.0: use a value in (0, 1]"),
    (("run", "--prompt", "x", "--top-p", "5"), "--top-p 5.0: use a value in (0, 1]"),
    (("run", "--prompt", "x", "--temperature", "-1"), "--temperature -1.0: use 0 (greedy) or a positive"),
    (("run", "--prompt", "x", "--min-bits", "3"), "give --quality too, or --bits for one width"),
    (("run", str(DEMO_MODEL.parent), "--prompt", "x"), "is a directory, not an .emoe model file"),
    (("run",), "give --prompt TEXT (or --chat for a conversation)"),
])
def test_cli_bad_input_gives_clear_error(args, message):
    r = cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""  # refused before the prompt is echoed


def test_cli_version_and_inspect_verify(tmp_path):
    assert cli("--version").stdout.strip() == f"edge-moe {edge_moe.__version__}"
    r = cli("inspect", "--verify")
    assert r.returncode == 0 and "all match" in r.stdout, r.stderr
    bad = tmp_path / "bad.emoe"
    data = bytearray(DEMO_MODEL.read_bytes())
    data[-5000] ^= 0xFF  # inside the last expert's last level
    bad.write_bytes(bytes(data))
    assert cli("inspect", str(bad)).returncode == 0  # the header and manifest are intact
    r = cli("inspect", str(bad), "--verify")
    assert r.returncode == 2 and "checksum mismatch in expert" in r.stderr and "Traceback" not in r.stderr


def test_token_ids_outside_the_vocabulary_are_refused(model):
    for ids in ([-1], [model.config.vocab_size]):
        with pytest.raises(UsageError, match="outside the vocabulary"):
            model.logits(ids)
        with pytest.raises(UsageError, match="outside the vocabulary"):
            list(model.generate_ids(ids, max_tokens=1))


def test_generate_is_deterministic_and_stream_matches(model):
    text = model.generate(PROMPT, max_tokens=16)
    assert text and text == model.generate(PROMPT, max_tokens=16)
    assert "".join(model.stream(PROMPT, max_tokens=16)) == text


def test_sampling_with_seed_is_reproducible(model):
    a = model.generate(PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert a == model.generate(PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    others = {model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=s) for s in range(4)}
    assert len(others) > 1


def test_logits_shape_and_bits(model):
    ids = model.encode("import os\nimport sys\n")
    l8, l2 = model.logits(ids, bits=8), model.logits(ids, bits=2)
    assert l8.shape == (len(ids), model.config.vocab_size) and l8.dtype == np.float32
    assert np.isfinite(l8).all() and not np.allclose(l8, l2)


def test_cpu_run_imports_no_torch_and_fits_300mb():
    """The cpu run path is numpy and numba only (torch is for cuda, conversion and tests): the demo model
    runs under a 300 MB budget, measured by the kernel's high-water mark of the process (VmHWM; getrusage
    would report pytest's RSS, which the child's mark inherits across exec)."""
    code = ("import re, sys; from edge_moe.cli import main; main(sys.argv[1:]); "
            "peak = int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]) * 1024; "
            "print('\\nimports torch:', 'torch' in sys.modules, peak)")
    r = subprocess.run([sys.executable, "-c", code, "run", "--prompt", PROMPT, "--max-tokens", "8",
                        "--memory-budget", "300MB"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    imported, peak = r.stdout.rsplit("imports torch:", 1)[1].split()
    assert imported == "False" and int(peak) <= 300e6, r.stderr
