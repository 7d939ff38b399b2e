"""BatchNorm in eval mode as its affine map (the form the vmapped perturbed fits use on a GPU)."""
import torch
from torch import nn

from daunce_core import ensemble as E


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(2, 3, 8, 8))
    bn = net[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return net.eval()


def test_affine_eval_batchnorm_equals_the_module_and_restores_it():
    net, x = _net(), torch.randn(5, 3, 8, 8)
    ref = net(x)
    with E.affine_eval_batchnorm(net):
        assert "forward" in vars(net[1])
        got = net(x)
    assert "forward" not in vars(net[1])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # per-model statistics under vmap, as predict() stacks them: model 1's shifted mean shows
    p0, b0 = E.split_state(net, {k: v.clone() for k, v in net.state_dict().items()})
    b1 = {k: (v + 1.0 if k.endswith("running_mean") else v) for k, v in b0.items()}
    out = E.predict(net, E.stack_states([p0, p0], "cpu"), E.stack_states([b0, b1], "cpu"), x)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    net[1].running_mean += 1.0
    torch.testing.assert_close(out[1], net(x), rtol=1e-5, atol=1e-6)


def test_affine_eval_batchnorm_leaves_train_mode_to_the_module():
    import copy

    net, x = _net(), torch.randn(5, 3, 8, 8)
    net.train()
    twin = copy.deepcopy(net)
    with E.affine_eval_batchnorm(net):
        got = net(x)
    ref = twin(x)  # batch statistics, and the running statistics' update
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(net[1].running_mean, twin[1].running_mean)
    assert not torch.allclose(ref, _net()(x), atol=1e-3)  # train mode is not eval mode here
