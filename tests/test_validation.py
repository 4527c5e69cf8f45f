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
    raises_naming("target", lambda: logitkit.cross_entropy(torch.randn(5), torch.tensor([1])))


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
