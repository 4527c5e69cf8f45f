"""nn Modules equal the functional calls; backend selection."""

import pytest
import torch

import logitkit
from logitkit import nn


def test_softmax_modules_match_functional(backend):
    x = torch.randn(3, 4, 5)
    for dim in (0, 1, -1):
        assert torch.equal(nn.Softmax(dim)(x), logitkit.softmax(x, dim=dim))
        assert torch.equal(nn.LogSoftmax(dim=dim)(x), logitkit.log_softmax(x, dim=dim))
    with pytest.warns(UserWarning):
        assert torch.equal(nn.Softmax()(x), logitkit.softmax(x, dim=0))


@pytest.mark.parametrize("cls", [nn.Softmax, nn.LogSoftmax])
def test_softmax_modules_pickle_and_old_state(cls):
    import copy
    import pickle
    import warnings

    x = torch.randn(3, 4)
    m = pickle.loads(pickle.dumps(cls(1)))
    assert m.dim == 1 and torch.equal(m(x), cls(1)(x)) and repr(m) == repr(cls(1))
    old = cls(1)
    del old.__dict__["dim"]  # a module pickled before ``dim`` existed: restored with the implicit dim, as torch
    restored = copy.deepcopy(old)
    assert restored.dim is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert torch.equal(restored(x), cls(None)(x))


# Each loss module option once: weights, ignore_index, every reduction, label smoothing.
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(weight=torch.rand(5) + 0.5),
        dict(ignore_index=2),
        dict(reduction="none"),
        dict(reduction="sum"),
        dict(label_smoothing=0.2),
    ],
)
def test_loss_modules_match_functional(backend, kw):
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.tensor([0, 2, 4, 2, 1, 3])
    ce = nn.CrossEntropyLoss(**kw)
    assert torch.equal(ce(x, t), logitkit.cross_entropy(x, t, **kw))
    g1 = torch.autograd.grad(ce(x, t).sum(), x)[0]
    g2 = torch.autograd.grad(logitkit.cross_entropy(x, t, **kw).sum(), x)[0]
    assert torch.equal(g1, g2)
    kw.pop("label_smoothing", None)
    lp = torch.log_softmax(x.detach(), 1)
    assert torch.equal(nn.NLLLoss(**kw)(lp, t), logitkit.nll_loss(lp, t, **kw))


def test_module_positional_order_as_torch(backend):
    w = torch.rand(5) + 0.5
    x, t = torch.randn(6, 5), torch.tensor([0, 2, 4, 2, 1, 3])
    assert torch.equal(
        nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)(x, t),
        logitkit.cross_entropy(x, t, w, ignore_index=2, reduction="sum", label_smoothing=0.1),
    )
    assert torch.equal(
        nn.NLLLoss(w, None, 2, None, "sum")(x, t), logitkit.nll_loss(x, t, w, ignore_index=2, reduction="sum")
    )
    assert isinstance(nn.CrossEntropyLoss(), torch.nn.Module)


def test_backend_selection():
    assert logitkit.get_backend() in ("auto", "reference", "triton")
    with logitkit.use_backend("reference"):
        assert logitkit.get_backend() == "reference"
        with logitkit.use_backend("auto"):
            assert logitkit.get_backend() == "auto"
        assert logitkit.get_backend() == "reference"
    x = torch.randn(4, 9)
    with logitkit.use_backend("reference"):
        ref = logitkit.log_softmax(x, dim=1)
    with logitkit.use_backend("auto"):  # CPU tensors: auto is the reference path
        assert torch.equal(logitkit.log_softmax(x, dim=1), ref)
