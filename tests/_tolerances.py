"""Every fixed tolerance of the test suite, in one table (STYLE.md "Tests").

Errors are in ulps of the *output* dtype against the float64/mpmath oracle on the rounded inputs.
Two rules apply: an absolute target from NUMERICS.md ("Accuracy targets") and the rule that travels across
dtypes, err(logitkit) <= err(torch in the same dtype) + TORCH_SLACK[dtype].
"""

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# NUMERICS.md accuracy targets, ulps of the output dtype.  logsumexp uses the mixed metric (oracle.lse_error).
# cross_entropy / nll_loss / entropy outputs are float32 for every half input, so they are keyed by fp32.
ULPS = {
    "softmax": {F16: 1.0, BF16: 1.0, F32: 4.0},
    "log_softmax": {F16: 1.0, BF16: 1.0, F32: 2.0},
    "logsumexp": {F16: 1.0, BF16: 1.0, F32: 2.0},
    "cross_entropy": {F32: 2.0},
    "selective_log_softmax": {F16: 1.0, BF16: 1.0, F32: 2.0},
}

# Entropy sums V products p_i * (L - d_i): no cancellation, but V roundings in float32; not in the NUMERICS.md
# table, so a relative bound in units of fp32 eps (log2(1025) ~ 10 plus the terms' own roundings).
ENTROPY_REL_EPS = 16.0

# err(logitkit) <= err(torch) + slack, in ulps of the dtype (or the scaled gradient metric).
TORCH_SLACK = {F16: 1.0, BF16: 1.0, F32: 2.0, F64: 4.0}

# Gradients: NUMERICS.md's condition-scaled metric err / (eps * scale) must stay within this many units.
# Half: 4, not 1: the backward reads the saved half output y, whose rounding is absolute (2**-25 in fp16)
# once y is subnormal, which the relative scale does not cover (torch shows the same error there).
GRAD_SCALED = {F16: 4.0, BF16: 4.0, F32: 4.0, F64: 8.0}

# Loss reductions (mean/sum over up to a few thousand rows) add a summation error of their own: relative bound
# in units of eps of the output dtype.
REDUCED_REL_EPS = {F32: 64.0, F64: 64.0}

# Parity with torch in float64 (same formula, different evaluation order): relative tolerance.
F64_PARITY = dict(rtol=1e-12, atol=1e-14)
