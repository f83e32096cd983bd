"""The cpu kernels compiled for x86 targets other than this host's, against the reference.

Each target class has its own code paths (isa.GFNI: AVX-512 with GFNI and VBMI; isa.STRIDED: AVX2
without AVX-512; neither: the portable LLVM forms, as on ARM), and a host only ever compiles its own.
So the kernel, LUT and forms, and packed-matrix tests also run in a child process with numba told to
compile for a target this host can execute but does not use itself (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES),
with its own numba cache directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_moe.kernels.cpu.simd import isa

HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,"
           "+popcnt,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+x87,+xsave")
TARGETS = {  # name: (NUMBA_CPU_FEATURES, the flag its paths stand for, whether this host can run them)
    "haswell": (HASWELL, "STRIDED", isa._has("+avx2", "+fma", "+f16c", "+bmi2")),
    "generic": ("", "portable", True),
}
REPO = Path(__file__).resolve().parents[2]


def host_runs_already(flag: str) -> bool:
    if flag == "portable":
        return not (isa.GFNI or isa.STRIDED or isa._AVX2)
    return bool(getattr(isa, flag))


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_kernels_compiled_for_another_target(target, tmp_path):
    features, flag, runnable = TARGETS[target]
    if not runnable:
        pytest.skip(f"this CPU cannot run {target} code")
    if host_runs_already(flag):
        pytest.skip(f"this host compiles the {target} paths itself")
    env = {**os.environ, "NUMBA_CPU_NAME": target, "NUMBA_CPU_FEATURES": features,
           "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    if not features:
        env.pop("NUMBA_CPU_FEATURES")
    check = "from edge_moe.kernels.cpu.simd import isa; print(isa.GFNI, isa.STRIDED, isa._AVX2)"
    flags = subprocess.run([sys.executable, "-c", check], env=env, cwd=REPO, capture_output=True, text=True)
    assert flags.stdout.split() == (["False", "True", "True"] if flag == "STRIDED" else ["False"] * 3), flags
    tests = ["tests/kernels/test_cpu_kernels.py", "tests/kernels/test_cpu_lut_form.py",
             "tests/kernels/test_forms_policy.py", "tests/model/test_packed.py", "tests/runtime/test_forms.py",
             "-k", "not demo_model"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and " failed" not in res.stdout
