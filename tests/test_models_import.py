"""Models by import path and by torchvision name, and the vmap check of the perturbed fits."""
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from daunce_core import ensemble as E
from daunce_core.config import ModelConfig
from daunce_core.models import ModelError, build_model, can_vmap, has_batchnorm

from helpers import ROOT, SNAKEMAKE

torch.set_num_threads(1)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, importable as ``my_models`` (as if on PYTHONPATH)."""
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        calls = []

        def small_cnn(in_shape, num_classes):
            calls.append((in_shape, num_classes))
            c, h, w = in_shape
            return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * h * w, num_classes))

        class Zoo:
            @staticmethod
            def linear(in_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))

        def not_a_model(in_shape, num_classes):
            return "a string"

        NUMBER = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models

    yield my_models
    monkeypatch.delitem(__import__("sys").modules, "my_models")


def test_factory_by_import_path(user_module):
    model = build_model(ModelConfig(arch="my_models:small_cnn"), (2, 5, 4), 7)
    assert user_module.calls == [((2, 5, 4), 7)]
    assert model(torch.zeros(3, 2, 5, 4)).shape == (3, 7)
    nested = build_model(ModelConfig(arch="my_models:Zoo.linear"), (1, 2, 2), 3)
    assert nested(torch.zeros(1, 1, 2, 2)).shape == (1, 3)


@pytest.mark.parametrize("arch, pattern", [
    ("no_such_package_xyz.models:f", r"model.arch: cannot import 'no_such_package_xyz.models' \(ModuleNotFoundError"),
    ("my_models:missing", r"model.arch: 'my_models' has no attribute 'missing'"),
    ("my_models:NUMBER", r"model.arch: my_models:NUMBER is a int, not a callable factory"),
    ("my_models:not_a_model", r"returned a str, not a torch.nn.Module"),
    ("my_models:a:b", r"model.arch: 'my_models:a:b' is not an import path 'package.module:function'"),
    ("resnet_nineteen", r"model.arch: unknown architecture 'resnet_nineteen'; choose 'mlp', 'resnet9', a torchvision"),
])
def test_bad_model_names_are_one_line_errors(user_module, arch, pattern):
    with pytest.raises(ModelError, match=pattern) as e:
        build_model(ModelConfig(arch=arch), (1, 4, 4), 3)
    assert "\n" not in str(e.value)


def test_torchvision_resnet18_with_num_classes():
    model = build_model(ModelConfig(arch="resnet18"), (3, 32, 32), 7)
    assert model.fc.out_features == 7 and has_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    # BatchNorm as for ResNet-9: vmapped in eval mode (frozen statistics, the perturbed fits) and in
    # train mode (from scratch: the running statistics are per-model state)
    assert can_vmap(model, x) == (True, "ran forward and backward under vmap")
    assert can_vmap(model, x, train_mode=True) == (True, "ran forward and backward under vmap")
    p, b = E.split_state(model, model.state_dict())
    stacked = E.predict(model, E.stack_states([p, p], "cpu"), E.stack_states([b, b], "cpu"), x)
    torch.testing.assert_close(stacked, torch.stack([out, out]), rtol=1e-4, atol=1e-4)


def test_torchvision_model_on_grayscale_images():
    model = build_model(ModelConfig(arch="resnet18"), (1, 8, 8), 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ModelError, match=r"torchvision's resnet18 takes images \[3, H, W\]; the data have \(2, 8, 8\)"):
        build_model(ModelConfig(arch="resnet18"), (2, 8, 8), 10)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.lin.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        return self.lin(x)


class WritesIntoFreshTensor(nn.Module):
    """Copies its input into a tensor it creates: unbatched under vmap, so the write fails."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        out = torch.zeros(x.shape[0], 4)
        out.copy_(x)
        return self.lin(out)


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return nn.functional.dropout(self.lin(x), 0.5, self.training)


def test_can_vmap_reasons():
    x = torch.randn(3, 4)
    mlp = build_model(ModelConfig(arch="mlp", hidden=[8]), (4,), 2)
    assert can_vmap(mlp, x)[0] and can_vmap(mlp, x, train_mode=True)[0]
    assert can_vmap(Hooked(), x) == (False, "lin has forward hooks")
    ok, why = can_vmap(WritesIntoFreshTensor(), x)
    assert not ok and why.startswith("RuntimeError") and "\n" not in why
    assert can_vmap(Dropping(), x)[0]  # eval mode: no randomness
    ok, why = can_vmap(Dropping(), x, train_mode=True)
    assert not ok and "random" in why
    m = Dropping().train()
    can_vmap(m, x)
    assert m.training  # the trial leaves the module as it found it


def test_torchvision_model_through_theta0_and_perturbed_fits():
    """resnet18 takes the ResNet-9 path: trained from scratch under vmap (BatchNorm in train
    mode), then fine-tuned under vmap with theta_0's statistics, as the loop would do it."""
    from daunce_core.config import DaunceConfig, TrainConfig

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    factory = lambda: build_model(ModelConfig(arch="resnet18"), (3, 16, 16), 3)  # noqa: E731
    net, p, b = E.fit_from_scratch(factory, X, y, [torch.arange(16).numpy()], [(0,)],
                                   TrainConfig(epochs=1, batch_size=8, lr=0.01))
    theta0 = {**E.unstack(p, 0), **E.unstack(b, 0)}
    assert not torch.equal(theta0["bn1.running_mean"], torch.zeros(64))  # statistics were learnt
    d = DaunceConfig(K=2, ratio=0.5, epochs=1, batch_size=4)
    fits = {mode: E.fit_perturbed(net, theta0, X, y, [0, 1], variant="daunce", cfg=d, lr=0.01, mode=mode)
            for mode in ("vmap", "loop")}
    for k in fits["vmap"][0]:
        torch.testing.assert_close(fits["vmap"][0][k], fits["loop"][0][k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fits["vmap"][1]["bn1.running_mean"][1], theta0["bn1.running_mean"])
    assert not torch.equal(fits["vmap"][0]["fc.weight"][0], theta0["fc.weight"])


class WritesInPlace(nn.Module):
    """An MLP whose forward writes into a tensor it creates (cannot be vmapped), and the same
    model written so that it can: both compute the same function of the same parameters."""

    def __init__(self, vmappable: bool = False):
        super().__init__()
        self.vmappable = vmappable
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        x = x.flatten(1)
        if not self.vmappable:
            out = torch.zeros(x.shape[0], 6)
            out.copy_(x)
            x = out
        return self.net(x)


def test_models_that_cannot_be_vmapped_are_fitted_one_by_one_with_the_same_randomness(caplog):
    """The fallback: theta_0 from scratch, the perturbed fits and the signals
    of a model that fails can_vmap equal those of its vmappable twin, and a notice is logged."""
    from daunce_core.config import DaunceConfig, TrainConfig
    from daunce_core.fit.ensemble import EnsembleFitter

    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(40, 1, 2, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    Xq, yq = X[:5] + 0.1, y[:5]
    out = {}
    for vmappable in (True, False):
        factory = lambda v=vmappable: WritesInPlace(v)  # noqa: E731
        with caplog.at_level("WARNING", logger="daunce_core.models"):
            caplog.clear()
            net, p, b = E.fit_from_scratch(factory, X, y, [torch.arange(40).numpy()], [(0,)],
                                           TrainConfig(epochs=2, batch_size=10, lr=0.05))
            theta0 = {**E.unstack(p, 0), **E.unstack(b, 0)}
            sig = EnsembleFitter(net, theta0, (X, y), (Xq, yq), variant="daunce",
                                 cfg=DaunceConfig(K=3, ratio=0.5, epochs=2, batch_size=5)).fit([0, 1, 2], 0.05)
        notices = [r.getMessage() for r in caplog.records]
        out[vmappable] = (theta0, sig)
        if vmappable:
            assert not notices
        else:
            assert len(notices) == 2 and all("one by one, with the same randomness" in n for n in notices)
            assert "retrain" in notices[0] and "daunce perturbed fits" in notices[1]
    for k, v in out[True][0].items():
        torch.testing.assert_close(out[False][0][k], v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[False][1].train, out[True][1].train, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[False][1].query, out[True][1].query, rtol=1e-4, atol=1e-5)
    assert out[False][1].query.shape == (3, 5)


# --- the factory's signature, checked before any job ---------------------------------------------

FACTORIES = '''
from torch import nn

def one_arg(num_classes):
    return nn.Linear(4, num_classes)

def keyword_only(*, in_shape, num_classes):
    return nn.Linear(4, num_classes)

def extra_required(in_shape, num_classes, depth):
    return nn.Linear(4, num_classes)

def with_default(in_shape, num_classes, depth=2):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))

def images_only(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Linear(c * h * w, num_classes)
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "user_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    __import__("sys").modules.pop("user_factories", None)


@pytest.mark.parametrize("name", ["one_arg", "keyword_only", "extra_required"])
def test_a_factory_that_cannot_take_in_shape_and_num_classes_is_refused_before_it_is_called(factories, name):
    from daunce_core.models import resolve_factory

    with pytest.raises(ModelError, match=rf"^model\.arch: user_factories:{name}\(.*\) cannot be called as "
                                         rf"{name}\(in_shape, num_classes\) .*docs/inputs\.md\)$") as e:
        resolve_factory(f"user_factories:{name}")
    assert "\n" not in str(e.value)
    resolve_factory("user_factories:with_default")  # a default for the rest is fine


def test_a_factory_failing_on_the_data_s_shape_names_the_shape(factories):
    """A factory written for images, given tabular data ([n, d]): the error names in_shape."""
    with pytest.raises(ModelError, match=r"^model\.arch: user_factories:images_only\(in_shape=\(6,\), "
                                         r"num_classes=3\) raised ValueError: not enough values to unpack"):
        build_model(ModelConfig(arch="user_factories:images_only"), (6,), 3)


@pytest.mark.slow
def test_the_workflow_checks_the_factory_when_it_is_parsed(factories):
    """snakemake -n with a factory of the wrong signature stops with the one line (no job ran)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(factories)])}
    proc = subprocess.run([SNAKEMAKE, "-n", "--cores", "1",
                           "--config", "model={arch: 'user_factories:one_arg'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "model.arch: user_factories:one_arg(num_classes) cannot be called as one_arg(in_shape, num_classes)" in out
