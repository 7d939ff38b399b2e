"""Each perturbed objective's gradient at theta_0 against its closed form (Tables 1 and 2)."""
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from daunce_core import objectives as O

torch.manual_seed(0)
N, D, C = 12, 5, 4


@pytest.fixture(scope="module")
def setup():
    net = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, C)).double()
    X = torch.randn(N, D, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    xi = torch.rand(N, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    return net, params, X, y, xi, torch.randint(0, C, (N,))


def per_example_grads(net, params, X, y, fn):
    """d fn(logits_i, y_i) / d theta for each example, flattened: [N, P]."""
    def one(p, x, t):
        return fn(functional_call(net, p, (x[None],)), t[None]).squeeze()
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([v.reshape(N, -1) for v in g.values()], dim=1)


def objective_grads(net, params, X, y, xi, variant, rho, gamma, y_noise):
    logits0 = functional_call(net, params, (X,)).detach()

    def one(p, x, t, x0, l0, yn):
        logits = functional_call(net, p, (x[None],))
        return O.classifier_objective(variant, logits, t[None], logits0=l0[None], xi=x0[None],
                                      rho=rho, gamma=gamma, y_noise=yn[None]).squeeze()
    g = vmap(grad(one), in_dims=(None, 0, 0, 0, 0, 0))(params, X, y, xi, logits0, y_noise)
    return torch.cat([v.reshape(N, -1) for v in g.values()], dim=1)


@pytest.mark.parametrize("rho,gamma", [(1.0, 1.0), (0.3, 2.0)])
@pytest.mark.parametrize("variant", O.VARIANTS)
def test_gradient_at_theta0_matches_closed_form(setup, variant, rho, gamma):
    net, params, X, y, xi, yn = setup
    got = objective_grads(net, params, X, y, xi, variant, rho, gamma, yn)
    gL = per_example_grads(net, params, X, y, O.cross_entropy)
    gf = per_example_grads(net, params, X, y, O.margin)
    with torch.no_grad():
        logits = functional_call(net, params, (X,))
        L = O.cross_entropy(logits, y)[:, None]
        f = O.margin(logits, y)[:, None]
    sigma = (rho * (2 * xi - 1))[:, None]
    expected = {
        # gamma grad L - (1 + sigma) grad L   (the loss term's gradient is cancelled on average)
        "daunce": (gamma - 1 - sigma) * gL,
        # the squared terms vanish at theta_0: only the perturbation remains
        "daunce_e": -sigma * gL,
        "daunce_t": -sigma * gf,
        # matched noise: the label of the noise term is the drawn one, yn, at scale rho
        "daunce_m": (gamma - 1) * gL - rho * per_example_grads(net, params, X, yn, O.cross_entropy),
        "daunce_bb": gamma * gL,
        "daunce_e_bb": gamma * L * gL,
        "daunce_t_bb": gamma * f * gf,
    }[variant]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("signal", ["loss", "margin"])
def test_logit_gradient_closed_form_matches_autograd(signal):
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (7,))
    s = O.signal_value(signal, logits, y).sum()
    (auto,) = torch.autograd.grad(s, logits)
    torch.testing.assert_close(O.signal_logit_grad(signal, logits.detach(), y), auto)


def test_margin_is_log_odds_of_the_correct_class():
    logits = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (9,))
    p = torch.softmax(logits, -1)[torch.arange(9), y]
    torch.testing.assert_close(O.margin(logits, y), torch.log(p / (1 - p)))


def test_first_order_term_handles_sequences_with_a_token_mask():
    B, T, V = 3, 4, 5
    logits, logits0 = torch.randn(B, T, V), torch.randn(B, T, V)
    grad0 = torch.randn(B, T, V) * torch.tensor([1, 1, 0, 0.0])[None, :, None]
    expected = torch.einsum("btv,btv->b", (logits - logits0)[:, :2], grad0[:, :2])
    torch.testing.assert_close(O.first_order_term(logits, logits0, grad0), expected)


def test_unknown_variant_and_missing_inputs_are_named():
    with pytest.raises(ValueError, match="daunce_x"):
        O.signal_of("daunce_x")
    with pytest.raises(ValueError, match="logits0"):
        O.classifier_objective("daunce", torch.randn(2, 3), torch.tensor([0, 1]))
    assert np.isclose(float(O.perturbed_objective("daunce_bb", torch.tensor([2.0]), gamma=0.5)), 1.0)
