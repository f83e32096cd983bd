"""simd._h2f, the metadata load of every kernel: the first n fp16 values as floats, zeros after, and
no byte read past them (checked against a page that faults on any read)."""

import ctypes
import mmap

import numpy as np
import pytest
from numba import njit

from edge_moe.kernels.cpu.simd.common import _fstore
from edge_moe.kernels.cpu.simd.fp16 import _h2f


@njit(cache=True)
def _halves(a, n, out):
    _fstore(_h2f(a, n), out.ctypes.data)


def guarded_page():
    """Two pages, the second readable by no one: values that end at the first page's end are
    followed by a fault, not by more memory."""
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(ctypes.c_void_p(base + page), page, 0) != 0:
        pytest.skip("mprotect is not available")
    return buf, base, page


@pytest.mark.parametrize("n", range(1, 17))
def test_h2f_reads_exactly_n_values(n):
    buf, base, page = guarded_page()
    values = np.arange(1, 17, dtype=np.float16) * np.float16(-0.75)
    start = page - 2 * n  # the n values end exactly where the faulting page starts
    np.frombuffer(buf, np.float16, n, start)[:] = values[:n]
    out = np.zeros(16, np.float32)
    _halves(base + start, n, out)
    np.testing.assert_array_equal(out, np.concatenate([values[:n].astype(np.float32), np.zeros(16 - n)]))
    ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + page), page, mmap.PROT_READ | mmap.PROT_WRITE)


def test_h2f_unaligned_start():
    values = np.arange(40, dtype=np.float16) / np.float16(8)
    raw = np.zeros(100, np.uint8)
    raw[2:82] = values.view(np.uint8)  # 2 bytes off a 4-byte boundary
    out = np.zeros(16, np.float32)
    for n in (7, 8, 16):
        _halves(raw.ctypes.data + 2, n, out)
        np.testing.assert_array_equal(out[:n], values[:n].astype(np.float32))
        assert not out[n:].any()
