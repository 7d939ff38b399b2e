"""ResNet-9 is the ffcv CIFAR-10 example's ``construct_model`` (examples/cifar/train_cifar.py of
libffcv/ffcv), the architecture of TRAK's CIFAR-10 benchmark and of the DAUNCE authors' code.

The numbers below are worked out from that reference, layer by layer, not read off our model.
"""
import torch

from daunce_core.config import ModelConfig
from daunce_core.models import ResNet9, build_model

# The reference, as (c_in, c_out, kernel, stride, padding) of its six conv_bn blocks in order
# (each: Conv2d without bias -> BatchNorm2d -> ReLU), then Linear(128, 10, bias=False) and Mul(0.2).
REFERENCE_CONVS = [
    (3, 64, 3, 1, 1),
    (64, 128, 5, 2, 2),
    (128, 128, 3, 1, 1), (128, 128, 3, 1, 1),  # Residual
    (128, 256, 3, 1, 1),                       # then MaxPool2d(2)
    (256, 256, 3, 1, 1), (256, 256, 3, 1, 1),  # Residual
    (256, 128, 3, 1, 0),                       # padding 0: the difference that was fixed
]

# Parameters (weights + BatchNorm affine; running statistics are buffers, not parameters):
#   conv 3->64 k3:     3*64*9    =     1,728   BN 2*64  =   128
#   conv 64->128 k5:   64*128*25 =   204,800   BN 2*128 =   256
#   2 x conv 128->128: 2*147,456 =   294,912   BN 2*256 =   512
#   conv 128->256:     128*256*9 =   294,912   BN 2*256 =   512
#   2 x conv 256->256: 2*589,824 = 1,179,648   BN 2*512 = 1,024
#   conv 256->128:     256*128*9 =   294,912   BN 2*128 =   256
#   linear 128->10:    128*10    =     1,280
#   convs 2,270,912 + BatchNorm 2,688 + linear 1,280 = 2,274,880
N_PARAMS = 2_274_880

# Spatial size of a 32x32 image, out = floor((in + 2*padding - kernel) / stride) + 1:
#   conv k3 p1: 32 -> conv k5 s2 p2: floor((32 + 4 - 5) / 2) + 1 = 16 -> residual: 16
#   -> conv k3 p1: 16 -> MaxPool2d(2): 8 -> residual: 8 -> conv k3 p0: 8 - 3 + 1 = 6
# so the global max-pool sees [B, 128, 6, 6] (with padding 1 it would be 8x8).
POOL_INPUT = (128, 6, 6)


def _features_before_pool(model: ResNet9, x: torch.Tensor) -> torch.Tensor:
    layers = list(model.net)
    cut = next(i for i, m in enumerate(layers) if isinstance(m, torch.nn.AdaptiveMaxPool2d))
    return torch.nn.Sequential(*layers[:cut])(x)


def test_resnet9_matches_the_reference_convs():
    model = ResNet9()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs]
    assert got == REFERENCE_CONVS
    assert all(c.bias is None for c in convs)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is None) for m in linear] == [(128, 10, True)]


def test_resnet9_parameter_count_is_the_references():
    model = build_model(ModelConfig(arch="resnet9"), (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS


def test_resnet9_feature_map_before_the_final_pool():
    model = ResNet9().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert tuple(_features_before_pool(model, x).shape) == (2, *POOL_INPUT)
        assert tuple(model(x).shape) == (2, 10)
