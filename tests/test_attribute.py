"""The one-call API on a user's own classifier."""
import numpy as np
import torch

from daunce_core import ensemble as E
from daunce_core.attribute import daunce_scores
from daunce_core.config import ModelConfig, TrainConfig
from daunce_core.data import DataConfig, load_dataset
from daunce_core.models import build_model


def test_a_query_identical_to_a_training_example_is_attributed_to_its_class():
    torch.set_num_threads(1)
    ds = load_dataset(DataConfig(n_train=300, n_query=10))
    X, y = torch.tensor(ds.X_train), torch.tensor(ds.y_train)
    factory = lambda: build_model(ModelConfig(hidden=[32]), (1, 8, 8), 10)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [np.arange(300)], [(0,)], TrainConfig(epochs=20, lr=0.05))
    model = factory()
    model.load_state_dict({**E.unstack(p, 0), **E.unstack(b, 0)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = np.arange(0, 300, 15)  # 20 training examples used as queries
    # correlation: a covariance is led by the examples whose loss varies most, not by the query's twin
    scores = daunce_scores(model, (X, y), (X[q], y[q]), K=40, epochs=5, lr=0.03, ratio=0.3, measure="correlation",
                           variant="daunce_t")
    assert scores.shape == (300, 20) and np.isfinite(scores).all()
    top = scores.argmax(axis=0)
    assert (ds.y_train[top] == ds.y_train[q]).mean() >= 0.8
    # the most helpful example is usually the query itself
    assert (top == q).mean() >= 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_bad_measure_is_refused_before_the_fits(monkeypatch):
    import pytest

    from daunce_core.fit import chunks

    def fit_all(*a, **kw):
        raise AssertionError("the models were fitted before the bad measure was refused")

    monkeypatch.setattr(chunks, "fit_all", fit_all)
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with pytest.raises(ValueError, match="measure must be one of .*got 'corr'"):
        daunce_scores(torch.nn.Linear(4, 3), (X, y), (X[:3], y[:3]), K=4, measure="corr", device="cpu")


def _frozen_first_layer(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net[0].requires_grad_(False)
    X = torch.randn(60, 6)
    y = torch.randint(0, 3, (60,))
    return net, X, y


def test_frozen_parameters_stay_frozen_in_every_perturbed_model():
    """requires_grad=False parameters are never perturbed: the stacked models that the
    classifier path (EnsembleFitter) trains keep theta_0's frozen weights exactly, while the
    trainable ones move."""
    from daunce_core.config import DaunceConfig

    net, X, y = _frozen_first_layer()
    theta0 = {k: v.detach().clone() for k, v in net.state_dict().items()}
    p, b = E.fit_perturbed(net, theta0, X, y, list(range(4)), variant="daunce", lr=0.1,
                           cfg=DaunceConfig(epochs=3, batch_size=8, trace_every=0))
    state = {**p, **b}
    for name in ("0.weight", "0.bias"):
        assert torch.equal(state[name], theta0[name].expand_as(state[name])), name
    assert not torch.allclose(state["2.weight"], theta0["2.weight"].expand_as(state["2.weight"]))


def test_a_frozen_layer_is_attributed_as_a_fixed_feature_map():
    """DAUNCE through a frozen first layer equals DAUNCE on its features with only the head: the
    frozen layer acts as data, not as parameters (a perturbed frozen layer would change the scores)."""
    net, X, y = _frozen_first_layer(1)
    kw = dict(K=6, epochs=2, lr=0.05, batch_size=8, device="cpu", measure="covariance")
    full = daunce_scores(net, (X, y), (X[:5], y[:5]), **kw)
    with torch.no_grad():
        F = net[1](net[0](X))
    head = torch.nn.Sequential(net[2])
    ref = daunce_scores(head, (F, y), (F[:5], y[:5]), **kw)
    np.testing.assert_allclose(full, ref, rtol=1e-4, atol=1e-6)


def test_an_all_frozen_model_is_refused_in_one_line():
    import pytest

    net, X, y = _frozen_first_layer()
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        daunce_scores(net, (X, y), (X[:3], y[:3]), K=4, epochs=1, lr=0.1, device="cpu")
