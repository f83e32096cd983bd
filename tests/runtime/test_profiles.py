"""Device profiles: every shipped one validates and applies, a bad field is refused by name, and flags
given on the command line win over the profile."""

import subprocess
import sys

import numba
import pytest

import edge_moe
from edge_moe.api import DEMO_MODEL
from edge_moe.cli import _parser, _settings
from edge_moe.errors import UsageError
from edge_moe.runtime.profiles import available, load_profile

SHIPPED = ["app-2gb", "laptop-16gb", "laptop-8gb", "raspberry-pi-5-8gb", "rtx-4060-laptop-8gb"]


def test_every_shipped_profile_validates():
    assert available() == SHIPPED
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name and profile.memory_budget > 0


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="demo model not built into the package")
@pytest.mark.parametrize("name", [n for n in SHIPPED if load_profile(n).device == "cpu"])
def test_every_cpu_profile_applies(name):
    options, knobs = _settings(_parser().parse_args(["run", "--profile", name, "--prompt", "x"]))
    profile = load_profile(name)
    assert options["memory_budget"] == profile.memory_budget and options["dense_bits"] == profile.dense_bits
    if (profile.threads or 0) > numba.config.NUMBA_NUM_THREADS:  # a device with more cores than this one
        with pytest.raises(UsageError, match=f"threads={profile.threads}"):
            edge_moe.load(**options)
        options["threads"] = None
    with edge_moe.load(**options) as m:
        assert m.memory_plan.budget == profile.memory_budget and m.dense_bits == profile.dense_bits
        assert list(m.generate_ids([1, 2, 3], max_tokens=3, **knobs))
        lo, hi = knobs.get("min_bits") or knobs["bits"], knobs.get("max_bits") or knobs["bits"]
        assert set(m.stats["bits_histogram"]) <= set(range(lo, hi + 1))  # the profile's request, as run


def test_flags_given_win_and_knobs_are_one_choice():
    args = _parser().parse_args(["run", "--profile", "laptop-8gb", "--memory-budget", "1GB", "--bits", "5",
                                 "--prompt", "x"])
    options, knobs = _settings(args)
    assert options["memory_budget"] == "1GB" and options["max_context"] == 4096  # the flag, the profile's
    assert knobs == {"bits": 5, "quality": None, "min_bits": None, "max_bits": None}  # no profile quality
    options, knobs = _settings(_parser().parse_args(["run", "--prompt", "x"]))
    assert options["max_context"] == 2048 and options["device"] == "cpu" and knobs["quality"] is None


@pytest.mark.parametrize("text, field", [
    ("name: x\ndense_bits: 3\n", "dense_bits"),
    ("name: x\nmemroy_budget: 3GB\n", "memroy_budget"),
    ("name: x\nmemory_budget: lots\n", "memory_budget"),
    ("name: x\nknobs: {bits: 9}\n", "knobs"),
    ("name: x\nknobs: {min_bits: 3}\n", "knobs"),
    ("name: x\nstreaming: fifo\n", "streaming"),
    ("name: x\nthreads: 0\n", "threads"),
    ("name: x\ncosts: {dram_read_gb_s: -1}\n", "costs"),
    ("description: no name\n", "name"),
])
def test_a_bad_field_is_refused_by_name(tmp_path, text, field):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=f"field '{field}'"):
        load_profile(str(path))


def test_cli_refuses_an_unknown_profile_in_one_line():
    r = subprocess.run([sys.executable, "-m", "edge_moe.cli", "run", "--profile", "nope", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("edge-moe: error: --profile nope: no such profile")
    assert "laptop-8gb" in r.stderr and "Traceback" not in r.stderr
