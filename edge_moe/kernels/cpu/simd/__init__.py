"""SIMD helpers of the cpu kernels, by ISA: isa (target flags, vector types), common, fp16, avx512, avx2,
avx2_strided, avx2_lut."""
