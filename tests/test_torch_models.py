"""Whole models trained side by side: torch's eager model and the same model after
bnc.torch.convert_batchnorm. Each step starts both from the same state (float rounding compounds
chaotically over SGD steps), then the loss, every parameter gradient and every buffer must agree
within float32 rounding. The models are defined here (torchvision from PyPI does not import with
the CPU torch of the tests): a ResNet-style net (basic blocks, a downsampling shortcut with its
own BN) in both memory formats, a MobileNet-style net (BN eps=1e-3, momentum=0.01, depthwise
convolutions) and an MLP with BatchNorm1d layers of momentum=None, affine=False and
track_running_stats=False.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnc.torch as bt


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2),
                                    BasicBlock(32, 32, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(x.mean((2, 3)))


class MobileNetish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()

        def bn(c):
            return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)

        def separable(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), bn(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False), bn(cout), nn.ReLU6())

        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), bn(16), nn.ReLU6(),
                                      separable(16, 24, 1), separable(24, 32, 2),
                                      separable(32, 32, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(48, 64), nn.BatchNorm1d(64, momentum=None), nn.ReLU(),
            nn.Linear(64, 64), nn.BatchNorm1d(64, affine=False), nn.ReLU(),
            nn.Linear(64, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(),
            nn.Linear(32, classes))

    def forward(self, x):
        return self.net(x)


MODELS = {
    "resnet": (ResNetish, (16, 3, 16, 16), torch.contiguous_format),
    "resnet-channels-last": (ResNetish, (16, 3, 16, 16), torch.channels_last),
    "mobilenet": (MobileNetish, (16, 3, 24, 24), torch.contiguous_format),
    "mlp": (MLP, (64, 48), torch.contiguous_format),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_side_by_side_with_torch(name):
    cls, shape, memory_format = MODELS[name]
    torch.manual_seed(0)
    ref = cls().to(memory_format=memory_format) if len(shape) == 4 else cls()
    ours = bt.convert_batchnorm(copy.deepcopy(ref))
    bns = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m).__module__ == "bnc.torch.modules" for m in bns)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        train = step < 5
        ref.train(train)
        ours.train(train)
        ours.load_state_dict(ref.state_dict())  # the same state at the start of every step
        x = torch.randn(shape, generator=g)
        if len(shape) == 4:
            x = x.contiguous(memory_format=memory_format)
        target = torch.randint(0, 10, (shape[0],), generator=g)
        for model in (ref, ours):
            model.zero_grad(set_to_none=True)
        loss_ref = nn.functional.cross_entropy(ref(x), target)
        loss = nn.functional.cross_entropy(ours(x), target)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step}: loss: {m}")
        if train:
            loss_ref.backward()
            loss.backward()
            for (pname, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
                # (a bias before a BN has a zero gradient, computed as rounding noise ~1e-9)
                scale = float(p_ref.grad.abs().max())
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-4 * scale + 1e-7,
                                           msg=lambda m, n=pname: f"step {step}: {n}.grad: {m}")
        for (bname, b_ref), b in zip(ref.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=bname: f"step {step}: {n}: {m}")
        if train:
            opt.step()
