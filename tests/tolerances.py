"""Every numerical tolerance of the test suite, each with its reason."""

# Our forward vs transformers' forward on the *same* weights (the 8-bit dequantized experts loaded
# into the transformers model): float32 everywhere, differing only in op order -> ~1e-6 relative.
FORWARD_SAME_WEIGHTS_REL = 1e-4

# One model's decode steps (one token per forward, on the KV cache) vs its prefill of the same tokens:
# the cpu kernels' one-token and many-token paths quantize activations to int16 and sum in other
# orders; measured 1.7e-5 (qwen3_moe) to 1.03e-4 (mixtral) relative on the tiny models.
DECODE_VS_PREFILL_REL = 5e-4

# Our 8-bit model vs transformers on the original bf16 weights: measured 0.29-0.56% relative logit
# error on the tiny models (4 bits: 5-9%, 2 bits: 20-37%); 2% leaves room for other seeds while a
# wrong forward (wrong norm, rope or routing) gives >30%.
LOGITS_8BIT_REL = 0.02

# Kernels vs the reference on dequantized weights: float32 accumulations in another order.
KERNEL_REL = 1e-4

# cpu backend vs the reference: activations enter its integer (VNNI) dot products as int16 per group
# of inputs (x ~ d_g * (256 h + l), error <= max|x_g| / 65278 per input). Measured up to 1.2e-4 on
# nested_matmul and 3.4e-4 on expert_ffn (its silu(g) * u activations are heavy-tailed), relative to
# the largest output; a wrong plane, offset or group gives > 1e-2. At <= ACT8_MAX_BITS bits the
# kernels take int8 inputs and the reference gets the same q8(x) (tests/kernels): measured <= 3.7e-4.
KERNEL_INT16_ACT_REL = 1e-3

# cpu backend at <= ACT8_MAX_BITS (int8 expert inputs, per group of 64-128) vs transformers on the same
# weights: measured 0.4-0.8% relative logit error on the tiny models at 3 and 4 bits; one level
# off (our b+1-bit forward against the b-bit weights) gives 4.2-16%.
FORWARD_INT8_ACT_REL = 0.02

# The LUT form vs a numpy oracle of its own arithmetic: float32 sums in another order.
LUT_ORACLE_REL = 1e-5

# The LUT form vs the exact 2-bit matmul on q8(x): tables of sums of 4 int8 digits (up to 4 x 127)
# requantized to int8 lose up to st / 2 per sum; measured 1.0-2.0e-2 of the largest output, where the
# planes read in the wrong layout give > 1 (the 2-bit weights themselves are 20-37% off bf16).
LUT_TABLE_REL = 5e-2

# A float32 op (attention, RMSNorm, routing softmax) vs torch's on the same inputs: another order of sums.
FLOAT32_OP_REL = 1e-5
FLOAT32_OP_ATOL = 1e-6

# One formula evaluated twice in float32 (dequantized rows vs their oracle): rounding only.
SAME_FORMULA_REL = 1e-5
SAME_FORMULA_ATOL = 1e-7
