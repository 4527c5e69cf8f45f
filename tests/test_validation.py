"""Bad input: the right exception type, and a message naming the argument."""

import pytest
import torch

import logitkit

X = torch.randn(4, 5)
T = torch.tensor([0, 1, 2, 3])


# Each public op on a list, a number and None: TypeError.
@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, None])
def test_non_tensor_input(bad):
    for call in (
        lambda: logitkit.softmax(bad, dim=0),
        lambda: logitkit.log_softmax(bad, dim=0),
        lambda: logitkit.logsumexp(bad, 0),
        lambda: logitkit.cross_entropy(bad, T),
        lambda: logitkit.nll_loss(bad, T),
        lambda: logitkit.selective_log_softmax(bad, T),
        lambda: logitkit.entropy(bad),
    ):
        with pytest.raises(TypeError):
            call()


# Sparse and nested tensors in each tensor argument: a TypeError naming it (not a RuntimeError from deep inside).
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's beta / prototype warnings for these layouts
@pytest.mark.parametrize("layout", ["coo", "csr", "nested"])
def test_non_dense_tensors_are_refused_by_name(layout):
    def conv(t):
        if layout == "nested":
            return torch.nested.nested_tensor(list(t.reshape(-1, t.shape[-1]))) if t.dim() else t
        return t.to_sparse() if layout == "coo" else (t.to_sparse_csr() if t.dim() == 2 else t.to_sparse())

    W, b, m = torch.randn(6, 5), torch.randn(6), torch.ones(4, 5, dtype=torch.bool)
    calls = {
        "input": [lambda: logitkit.softmax(conv(X), 1), lambda: logitkit.log_softmax(conv(X), 1),
                  lambda: logitkit.logsumexp(conv(X), 1), lambda: logitkit.cross_entropy(conv(X), T),
                  lambda: logitkit.nll_loss(conv(X), T), lambda: logitkit.entropy(conv(X)),
                  lambda: logitkit.linear_cross_entropy(conv(X), W, T)],
        "mask": [lambda: logitkit.softmax(X, 1, mask=conv(m))],
        "weight": [lambda: logitkit.cross_entropy(X, T, weight=conv(torch.ones(5)))],
        "linear_weight": [lambda: logitkit.linear_cross_entropy(X, conv(W), T)],
        "linear_bias": [lambda: logitkit.linear_cross_entropy(X, W, T, linear_bias=conv(b))],
        "index": [lambda: logitkit.selective_log_softmax(X, conv(T.reshape(4, 1)))],
    }
    if layout == "coo":  # 1-D targets have no CSR or nested form
        calls["target"] = [lambda: logitkit.cross_entropy(X, conv(T)), lambda: logitkit.nll_loss(X, conv(T))]
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=f"^{name} must be a dense"):
                fn()


# Integer and bool inputs, which torch rejects for softmax unless dtype= is a float type.
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_needs_float_dtype(dtype):
    x = torch.ones(2, 3, dtype=dtype)
    for op in (logitkit.softmax, logitkit.log_softmax):
        with pytest.raises((TypeError, RuntimeError)):
            op(x, dim=1)
        assert op(x, dim=1, dtype=torch.float32).dtype == torch.float32
    with pytest.raises((TypeError, RuntimeError)):
        logitkit.softmax(torch.randn(2, 3), dim=1, dtype=torch.int64)
    with pytest.raises((TypeError, RuntimeError, ValueError)):
        logitkit.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises((TypeError, RuntimeError, ValueError)):
        logitkit.entropy(x)


# Out of range positive and negative dims, for each op that takes a dim.
@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range(dim):
    for call in (
        lambda: logitkit.softmax(X, dim=dim),
        lambda: logitkit.log_softmax(X, dim=dim),
        lambda: logitkit.logsumexp(X, dim),
        lambda: logitkit.logsumexp(X, (0, dim)),
        lambda: logitkit.entropy(X, dim),
        lambda: logitkit.selective_log_softmax(X, T[:, None], dim),
    ):
        with pytest.raises(IndexError):
            call()


def raises_naming(word, fn, exc=(ValueError, IndexError)):
    with pytest.raises(exc) as info:
        fn()
    assert word in str(info.value).lower(), str(info.value)


# Targets that cannot match (N, C): a wrong batch, a wrong K-dim shape, out-of-range classes, bad prob shapes.
@pytest.mark.parametrize(
    "target",
    [
        torch.tensor([0, 1, 2]),  # batch 3 vs 4
        torch.tensor([[0, 1, 2, 3]]),  # 2-d target for 2-d input
        torch.tensor([0, 1, 5, 3]),  # class 5 >= C
        torch.tensor([0, -1, 2, 3]),  # negative and not ignore_index
        torch.rand(4, 6),  # probabilities of the wrong width
        torch.rand(3, 5),  # probabilities of the wrong batch
    ],
)
def test_bad_target(target):
    raises_naming("target", lambda: logitkit.cross_entropy(X, target))
    if not target.is_floating_point():
        raises_naming("target", lambda: logitkit.nll_loss(X, target))


def test_bad_target_kdim_and_unbatched():
    raises_naming("target", lambda: logitkit.cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long)))
    raises_naming("target", lambda: logitkit.cross_entropy(torch.randn(5), torch.tensor(7)))
    raises_naming("target", lambda: logitkit.cross_entropy(torch.randn(5), torch.tensor([1, 2])))  # (1,) is fine


# weight of the wrong length or rank.
@pytest.mark.parametrize("weight", [torch.ones(4), torch.ones(6), torch.ones(5, 1)])
def test_bad_weight(weight):
    raises_naming("weight", lambda: logitkit.cross_entropy(X, T, weight=weight))
    raises_naming("weight", lambda: logitkit.nll_loss(X, T, weight=weight))


# Unknown reduction names, including torch's legacy spellings that are not reductions.
@pytest.mark.parametrize("reduction", ["avg", "elementwise_mean", "", "MEAN"])
def test_bad_reduction(reduction):
    raises_naming("reduction", lambda: logitkit.cross_entropy(X, T, reduction=reduction))
    raises_naming("reduction", lambda: logitkit.nll_loss(X, T, reduction=reduction))


# Just outside [0, 1] on both sides and far outside.
@pytest.mark.parametrize("eps", [-0.1, 1.0001, 2.0])
def test_bad_label_smoothing(eps):
    raises_naming("label_smoothing", lambda: logitkit.cross_entropy(X, T, label_smoothing=eps))


@pytest.mark.parametrize("eps", [torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64), torch.tensor(0)])
def test_label_smoothing_zero_dim_tensor_as_torch(eps):
    # torch takes a 0-d tensor (e.g. a smoothing schedule's value) as the float it holds
    want = torch.nn.functional.cross_entropy(X, T, label_smoothing=eps)
    torch.testing.assert_close(logitkit.cross_entropy(X, T, label_smoothing=eps), want, rtol=1e-6, atol=0)
    mod = logitkit.nn.CrossEntropyLoss(label_smoothing=eps)
    torch.testing.assert_close(mod(X, T), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("eps", [torch.tensor([0.1]), torch.tensor(True), torch.tensor(1.5)])
def test_label_smoothing_bad_tensor(eps):
    raises_naming("label_smoothing", lambda: logitkit.cross_entropy(X, T, label_smoothing=eps),
                  (TypeError, ValueError))


# A mask of the wrong width, of a shape that broadcasts the wrong way, of a higher rank.
@pytest.mark.parametrize("shape", [(4, 4), (5, 1), (2, 4, 5)])
def test_mask_not_broadcastable(shape):
    m = torch.ones(shape, dtype=torch.bool)
    raises_naming("mask", lambda: logitkit.softmax(X, dim=1, mask=m))
    raises_naming("mask", lambda: logitkit.log_softmax(X, dim=1, mask=m))
    raises_naming("mask", lambda: logitkit.logsumexp(X, 1, mask=m))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        with logitkit.use_backend("cuda-magic"):
            pass


# Parity with torch found in review (2026-12-07): integer-like dims, ignore_index with probabilities, a weight
# that requires grad, logsumexp over several dims with an empty kept dim, complex logsumexp.
def test_dim_takes_integer_likes_but_not_bool():
    np = pytest.importorskip("numpy")
    for d in (np.int64(1), np.int32(-1), torch.tensor(1)):
        assert torch.equal(logitkit.softmax(X, d), logitkit.softmax(X, 1))
        assert torch.equal(logitkit.logsumexp(X, d), logitkit.logsumexp(X, 1))
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError):
            logitkit.softmax(X, bad)


def test_ignore_index_with_probabilities():
    p = torch.softmax(torch.randn(4, 5), 1)
    for ii in (-100, -1):  # torch accepts negative ones (nothing to ignore)
        assert torch.equal(logitkit.cross_entropy(X, p, ignore_index=ii), logitkit.cross_entropy(X, p))
    raises_naming("ignore_index", lambda: logitkit.cross_entropy(X, p, ignore_index=0))


def test_weight_requiring_grad_is_refused_as_torch():
    w = torch.rand(5, requires_grad=True)
    raises_naming("weight", lambda: logitkit.cross_entropy(X, T, weight=w))
    with pytest.raises(RuntimeError):
        torch.nn.functional.cross_entropy(X, T, weight=w)
    with torch.no_grad():  # as torch: no graph, no complaint
        want = torch.nn.functional.cross_entropy(X.double(), T, weight=w.double())
        assert abs(logitkit.cross_entropy(X, T, weight=w).item() - want.item()) < 1e-6


def test_logsumexp_several_dims_empty_kept_dim():
    x = torch.randn(0, 3, 4)
    for keepdim in (False, True):
        got, want = logitkit.logsumexp(x, (1, 2), keepdim), torch.logsumexp(x, (1, 2), keepdim)
        assert got.shape == want.shape and got.dtype == want.dtype


def test_logsumexp_complex_as_torch():
    z = torch.tensor([[1 + 1j, 2 - 1j]])
    assert torch.equal(logitkit.logsumexp(z, 1), torch.logsumexp(z, 1))
    with pytest.raises(TypeError):
        logitkit.logsumexp(z, 1, mask=torch.ones(1, 2, dtype=torch.bool))


def test_ignore_index_must_be_an_int_as_torch():
    np = pytest.importorskip("numpy")
    h, W = torch.randn(4, 3), torch.randn(5, 3)
    for bad in (1.0, True, "1", None):
        for call, torch_call in (
            (lambda bad=bad: logitkit.cross_entropy(X, T, ignore_index=bad),
             lambda bad=bad: torch.nn.functional.cross_entropy(X, T, ignore_index=bad)),
            (lambda bad=bad: logitkit.nll_loss(X, T, ignore_index=bad),
             lambda bad=bad: torch.nn.functional.nll_loss(X, T, ignore_index=bad)),
        ):
            raises_naming("ignore_index", call, TypeError)
            with pytest.raises(TypeError):
                torch_call()
        if bad is not None:  # linear_cross_entropy's default is None
            raises_naming("ignore_index", lambda bad=bad: logitkit.linear_cross_entropy(h, W, T, ignore_index=bad),
                          TypeError)
    for ok in (np.int64(1), torch.tensor(1)):  # __index__ integers count, as torch
        want = torch.nn.functional.cross_entropy(X.double(), T, ignore_index=1)
        assert abs(logitkit.cross_entropy(X, T, ignore_index=ok).item() - want.item()) < 1e-6
        want = torch.nn.functional.nll_loss(X, T, ignore_index=1)
        assert abs(logitkit.nll_loss(X, T, ignore_index=ok).item() - want.item()) < 1e-6
        want = torch.nn.functional.linear_cross_entropy(h.double(), W.double(), T, ignore_index=1)
        assert abs(logitkit.linear_cross_entropy(h, W, T, ignore_index=ok).item() - want.item()) < 1e-6


def test_logsumexp_out_as_torch():
    x = torch.randn(3, 4)
    for dtype in (torch.float32, torch.float64, torch.float16):
        out = torch.empty(3, dtype=dtype)
        got = logitkit.logsumexp(x, 1, out=out)
        assert got is out and got.dtype == dtype
        assert torch.equal(got, logitkit.logsumexp(x, 1).to(dtype))
    m = torch.tensor([[True, False, True, True]] * 3)
    out = torch.empty(1, 3)
    assert logitkit.logsumexp(x, 1, keepdim=True, out=out, mask=m) is out
    assert torch.equal(out, logitkit.logsumexp(x, 1, keepdim=True, mask=m))
    out = torch.empty(0)  # an empty out is resized silently, a wrong non-empty one with a warning (as torch)
    assert logitkit.logsumexp(x, (0, 1), out=out).shape == ()
    out = torch.empty(5)
    with pytest.warns(UserWarning, match="resized"):
        logitkit.logsumexp(x, 1, out=out)
    assert out.shape == (3,) and torch.equal(out, logitkit.logsumexp(x, 1))
    raises_naming("out", lambda: logitkit.logsumexp(x, 1, out=torch.empty(3, dtype=torch.int64)), TypeError)
    raises_naming("out", lambda: logitkit.logsumexp(x, 1, out=[0.0]), TypeError)
    xr = x.clone().requires_grad_()
    for a, o in ((xr, torch.empty(3)), (x, torch.empty(3, requires_grad=True))):
        with pytest.raises(RuntimeError, match="out="):
            logitkit.logsumexp(a, 1, out=o)
        with pytest.raises(RuntimeError, match="out="):
            torch.logsumexp(a, 1, out=o)
    with torch.no_grad():
        assert torch.equal(logitkit.logsumexp(xr, 1, out=torch.empty(3)), logitkit.logsumexp(x, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float64_probabilities_give_a_float64_loss_as_torch(dtype):
    x = (torch.randn(6, 7) * 4).to(dtype).requires_grad_()
    p = torch.softmax(torch.randn(6, 7, dtype=torch.float64), 1)
    for red in ("mean", "sum", "none"):
        loss = logitkit.cross_entropy(x, p, reduction=red, label_smoothing=0.1)
        assert loss.dtype == torch.nn.functional.cross_entropy(x, p, reduction=red).dtype == torch.float64
        # computed in float64 from the (exact) float64 cast of the logits
        want = torch.nn.functional.cross_entropy(x.double(), p, reduction=red, label_smoothing=0.1)
        assert torch.allclose(loss, want, rtol=1e-13, atol=0), (loss - want).abs().max()
        (g,) = torch.autograd.grad(loss.sum(), x)
        (gw,) = torch.autograd.grad(want.sum(), x)
        assert g.dtype == dtype and torch.equal(g, gw)
    h, W = torch.randn(6, 3), torch.randn(7, 3)
    got = logitkit.linear_cross_entropy(h, W, p)
    want = torch.nn.functional.linear_cross_entropy(h, W, p)
    assert got.dtype == want.dtype == torch.float64
    assert abs(got.item() - torch.nn.functional.linear_cross_entropy(h.double(), W.double(), p).item()) < 1e-5
    q = p.float()  # float32 probabilities with half logits: a float32 loss (both)
    assert logitkit.cross_entropy(x, q).dtype == torch.float32
