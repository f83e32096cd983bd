"""Constants of the cpu kernels: digit bounds, work sizes, the storage-form tags, plane weights."""

from __future__ import annotations

import numpy as np

from edge_moe.format.nested import MAX_BITS

XDIGIT_MAX = 127 * 256  # |x / d| bound: both balanced base-256 digits fit in int8, and the high
# digit alone is x quantized to int8 with scale max|x_g| / 127
MAX_GROUP = 4096  # (h << 8) + l of one group must fit in int32: 64 words * 130560 * 256 < 2^31
PASS_BYTES = 128 * 1024  # several tokens on an expert in nibble form at <= 4 bits: one GEMV per token
# over each block of rows whose nibbles take this many bytes, which stay in L2 for the next token's
# (the nibbles need no building, so this beats _gemm's codes built once per group)
ROWS_PER_ITEM = 256  # output rows per parallel work item: whole LUT_ROWS blocks; smaller items cost more
# scheduling per call
PREFETCH_BYTES = 2048  # how far ahead in each plane a GEMV row asks for its next rows
DIGIT_PAD = 3 * 128  # readable bytes after the digits: a last 512-input block's missing groups
ACT8_MAX_BITS = 4  # at <= this many bits the dots use only the high digit: int8 activations (Q8)
HIGH_UNIT, ONE_UNIT = np.float32(256.0), np.float32(1.0)  # weights of the high and low digits
PLANE_FORM, NIBBLE_FORM, LUT_FORM = 0, 1, 2  # how an expert's chunks hold it: as written; rewritten by
# to_nibble_form; rewritten by to_lut_form (the kernels' `form`, one per expert)
_FORMS = {PLANE_FORM: "planes", NIBBLE_FORM: "nibble form", LUT_FORM: "LUT form"}
LUT_ROWS = 16  # rows per block of the LUT form
_POWERS = np.repeat((128 >> np.arange(MAX_BITS)).astype(np.uint8)[:, None], 64, axis=1)  # [8, 64]
# [b, p]: plane p's weight in codes q >> (8 - b) (the AVX2 GEMM's, <= 15 at b <= 4), 0 for p >= b
_LOW_POWERS = np.array([[[(1 << (b - 1 - p)) if p < b else 0] * 64 for p in range(MAX_BITS)]
                        for b in range(MAX_BITS + 1)], np.uint8)
