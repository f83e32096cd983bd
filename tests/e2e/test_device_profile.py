"""`edge-moe device-profile` measures this machine and writes a profile that validates and applies."""

import subprocess
import sys

import pytest

from edge_moe.api import DEMO_MODEL
from edge_moe.runtime.profiles import load_profile

pytestmark = pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo model not built into the package")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_moe.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_device_profile_writes_a_profile_that_applies(tmp_path):
    out = tmp_path / "here.yaml"
    r = cli("device-profile", "--out", str(out))
    assert r.returncode == 0, r.stderr
    profile = load_profile(str(out))
    costs = profile.costs
    assert costs["dram_read_gb_s"] > 0 and costs["disk_read_mb_s"] > 0 and costs["disk_direct_read_mb_s"] > 0
    assert sorted(costs["expert_ms"]) == list(range(2, 9)) and costs["expert_model"] == "demo.emoe"
    assert profile.memory_budget > 0 and profile.threads >= 1
    r = cli("run", "--profile", str(out), "--prompt", "def f(x):", "--max-tokens", "4")
    assert r.returncode == 0 and r.stdout.startswith("def f(x):"), r.stderr


def test_device_profile_refuses_a_directory(tmp_path):
    r = cli("device-profile", "--out", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
