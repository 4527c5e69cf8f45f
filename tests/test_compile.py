"""Every public op once under torch.compile(fullgraph=True), forward and backward ('aot_eager': no C++ build)."""

import pytest
import torch

import logitkit

torch._dynamo.config.cache_size_limit = 64

X = torch.randn(4, 7)
T = torch.tensor([0, 3, -100, 6])

# One call per public op, with the options that take distinct code paths (mask, prob targets).
CASES = {
    "softmax": lambda x: logitkit.softmax(x, dim=-1),
    "log_softmax_mask": lambda x: logitkit.log_softmax(x, dim=1, mask=x > -1),
    "logsumexp": lambda x: logitkit.logsumexp(x, (0, 1)),
    "cross_entropy": lambda x: logitkit.cross_entropy(x, T, label_smoothing=0.1),
    "cross_entropy_prob": lambda x: logitkit.cross_entropy(x, torch.softmax(X, 1)),
    "nll_loss": lambda x: logitkit.nll_loss(x, T),
    "selective_log_softmax": lambda x: logitkit.selective_log_softmax(x, T.clamp_min(0)[:, None]),
    "entropy": lambda x: logitkit.entropy(x),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile(backend, name):
    fn = CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x1 = X.clone().requires_grad_()
    x2 = X.clone().requires_grad_()
    out, ref = compiled(x1), fn(x2)
    assert torch.equal(out, ref)
    g = torch.rand(ref.shape)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
