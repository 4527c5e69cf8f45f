"""Every public op once under torch.compile(fullgraph=True), forward and backward ('aot_eager': no C++ build)."""

import pytest
import torch

import logitkit

torch._dynamo.config.cache_size_limit = 64

X = torch.randn(4, 7)
T = torch.tensor([0, 3, -100, 6])
CUDA = torch.cuda.is_available()


def cases(X: torch.Tensor, T: torch.Tensor) -> dict:
    """One call per public op, with the options that take distinct code paths (mask, prob targets)."""
    P = torch.softmax(X.detach(), 1)
    return {
        "softmax": lambda x: logitkit.softmax(x, dim=-1),
        "log_softmax_mask": lambda x: logitkit.log_softmax(x, dim=1, mask=x > -1),
        "logsumexp": lambda x: logitkit.logsumexp(x, (0, 1)),
        "cross_entropy": lambda x: logitkit.cross_entropy(x, T, label_smoothing=0.1),
        "cross_entropy_prob": lambda x: logitkit.cross_entropy(x, P),
        "nll_loss": lambda x: logitkit.nll_loss(x, T),
        "selective_log_softmax": lambda x: logitkit.selective_log_softmax(x, T.clamp_min(0)[:, None]),
        "entropy": lambda x: logitkit.entropy(x),
        # the input as hidden states (M, D) against a fixed (V, D) classifier: both strategies' kernels
        "linear_cross_entropy": lambda x: logitkit.linear_cross_entropy(
            x, _classifier(x), T, label_smoothing=0.1, strategy="token_chunks"),
        "linear_cross_entropy_vocab_blocks": lambda x: logitkit.linear_cross_entropy(
            x, _classifier(x), T, z_loss=1e-3, strategy="vocab_blocks"),
    }


def _classifier(x: torch.Tensor) -> torch.Tensor:
    """A fixed (V, D) weight for hidden states x (M, D): V = D + 4 classes, so targets of T stay in range."""
    D = x.shape[-1]
    return torch.linspace(-1.0, 1.0, (D + 4) * D, dtype=x.dtype, device=x.device).reshape(D + 4, D)


CASES = cases(X, T)


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


# On a GPU (skipped elsewhere): the kernels' torch.library ops under inductor, and CUDA-graph capture.
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_cuda_inductor(name):
    xc, tc = torch.randn(64, 1000, device="cuda"), torch.randint(0, 1000, (64,), device="cuda")
    fn = cases(xc, tc)[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    x1, x2 = xc.clone().requires_grad_(), xc.clone().requires_grad_()
    out, ref = compiled(x1), fn(x2)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    g = torch.rand(ref.shape, device="cuda")
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-6, atol=1e-7)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_capture_forward_and_backward(dtype):
    """softmax, log_softmax, logsumexp and cross_entropy (fwd + bwd) replay from a captured CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 5000, device="cuda", generator=gen).to(dtype)
    t = torch.randint(0, 5000, (256,), device="cuda", generator=gen)

    def step(z):
        return (
            logitkit.cross_entropy(z, t)
            + logitkit.log_softmax(z, -1).float().mean()
            + logitkit.softmax(z, 0).float().square().sum()
            + logitkit.logsumexp(z, 1).float().mean()
        )

    graphed = torch.cuda.make_graphed_callables(step, (x.clone().requires_grad_(),))
    for seed in (1, 2):
        xs = torch.randn(256, 5000, device="cuda", generator=gen.manual_seed(seed)).to(dtype)
        a, b = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        out = graphed(a)
        out.backward()
        ref = step(b)
        ref.backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_smoothed", "nll_loss", "with_stats", "module"])
def test_dynamic_shapes_compile_once_across_vocabulary_sizes(name):
    """torch.compile(dynamic=True) keeps the class count symbolic: one graph for every (M, V), as torch's
    F.cross_entropy (formatting V into the device-side bounds message used to specialise it: a recompile per V)."""
    import torch.nn.functional as F

    ops = {
        "cross_entropy": lambda x, t: logitkit.cross_entropy(x, t),
        "cross_entropy_smoothed": lambda x, t: logitkit.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3),
        "nll_loss": lambda x, t: logitkit.nll_loss(x, t),
        "with_stats": lambda x, t: sum(a.sum() for a in logitkit.cross_entropy_with_stats(x, t)),
        "module": lambda x, t: logitkit.nn.CrossEntropyLoss()(x, t),
    }
    refs = {
        "cross_entropy": lambda x, t: F.cross_entropy(x, t),
        "cross_entropy_smoothed": lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1)
        + 1e-3 * (torch.logsumexp(x, -1) ** 2).mean(),
        "nll_loss": lambda x, t: F.nll_loss(x, t),
        "module": lambda x, t: F.cross_entropy(x, t),
    }
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(ops[name], backend=backend, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for M, V in [(4, 7), (5, 9), (6, 11), (13, 3)]:
        x = torch.randn(M, V, dtype=torch.float64, generator=gen, requires_grad=True)
        t = torch.randint(0, V, (M,), generator=gen)
        y = f(x, t)
        y.backward()
        if name in refs:
            x2 = x.detach().requires_grad_()
            ref = refs[name](x2, t)
            ref.backward()
            assert abs(float(y) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref)))
            assert float((x.grad - x2.grad).abs().max()) <= 1e-12
    assert len(graphs) == 1, f"{len(graphs)} graphs for 4 shapes (expected 1)"
