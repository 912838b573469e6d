"""Small classic CNNs: LeNet-5 and TF-slim's LeNet (MNIST), CifarNet (TF-slim, CIFAR-10) and the CIFAR AlexNet of
Ye et al.

All four are Conv-ReLU networks without batch normalisation (the papers' models), so their convs keep a bias.
Layer names: ``conv1``, ``conv2``, ... for the convolutions, ``fc1``, ``fc2`` for the hidden fully connected
layers and ``fc`` for the classifier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from sparsetrain.models._common import check_width_mult, init_weights, scale_channels
from sparsetrain.models._registry import register_model

__all__ = ["LeNet5", "LeNetSlim", "CifarNet", "AlexNetCifar", "lenet5", "lenet_slim", "cifarnet", "alexnet_cifar"]


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling.

    ``conv1`` 5x5 (6) - pool - ``conv2`` 5x5 (16) - pool - ``fc1`` (120) - ``fc2`` (84) - ``fc``.
    With the default ``padding=2`` on ``conv1`` a 28x28 MNIST image yields the classic 16x5x5 feature map.
    An ``AdaptiveAvgPool2d(5)`` before the flatten is the identity in that case (and for 32x32 inputs with
    ``padding=0``, the original LeNet-5 setting) and keeps other input sizes working (e.g. 32x32 with padding 2).

    Args:
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: conv channels become ``ceil(c * width_mult)``.
        scale_hidden_fc: Also scale the hidden FC widths (120, 84) by ``width_mult``.
        padding: Zero padding of ``conv1`` (2 for 28x28 inputs, 0 for the original 32x32 setting).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        scale_hidden_fc: bool = True,
        padding: int = 2,
    ) -> None:
        super().__init__()
        w = check_width_mult(width_mult)
        c1, c2 = scale_channels(6, w), scale_channels(16, w)
        h1, h2 = (scale_channels(120, w), scale_channels(84, w)) if scale_hidden_fc else (120, 84)
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(5)
        self.fc1 = nn.Linear(c2 * 5 * 5, h1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(h1, h2)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(h2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc(x)


class LeNetSlim(nn.Module):
    """TF-slim's LeNet (``nets/lenet.py`` of tensorflow/models, research/slim), the MNIST model of TensorQuant.

    ``conv1`` 5x5 (32, SAME) - ReLU - max-pool 2 - ``conv2`` 5x5 (64, SAME) - ReLU - max-pool 2 - ``fc1`` (1024) -
    ReLU - dropout 0.5 - ``fc`` (logits). slim's scopes are conv1, conv2, fc3 and fc4 (TensorQuant's Table 1 rows);
    here the hidden FC layer is ``fc1`` and the classifier ``fc``, as in the other models. slim's max-pools are
    'VALID' 2x2/2, so a 28x28 MNIST image gives a 64x7x7 map (3136 inputs to ``fc1``). Unlike classic LeNet-5
    (6-16-120-84, 62 k parameters) this net has 3.27 M parameters, 98 % of them in ``fc1``. Initialisation is the
    package's (:func:`~sparsetrain.models._common.init_weights`), not slim's truncated normal (stddev 0.1).
    An ``AdaptiveAvgPool2d(7)`` before the flatten is the identity for 28x28 inputs.

    Args:
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: conv channels become ``ceil(c * width_mult)``.
        scale_hidden_fc: Also scale the hidden FC width (1024) by ``width_mult``.
        dropout: Dropout probability after ``fc1`` (slim: dropout_keep_prob 0.5).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        scale_hidden_fc: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        w = check_width_mult(width_mult)
        c1, c2 = scale_channels(32, w), scale_channels(64, w)
        h = scale_channels(1024, w) if scale_hidden_fc else 1024
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc1 = nn.Linear(c2 * 7 * 7, h)
        self.relu3 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc = nn.Linear(h, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.drop1(self.relu3(self.fc1(x)))
        return self.fc(x)


class CifarNet(nn.Module):
    """TF-slim's CifarNet (``nets/cifarnet.py``), the CIFAR-10 model of TensorQuant and Changpinyo et al.

    ``conv1`` 5x5 (64, SAME) - ReLU - max-pool 2 - LRN - ``conv2`` 5x5 (64, SAME) - ReLU - LRN - max-pool 2 -
    ``fc1`` (384) - ReLU - dropout - ``fc2`` (192) - ReLU - ``fc``. (slim's names: conv1, conv2, fc3, fc4, logits.)

    The LRN layers (``norm1``/``norm2``) reproduce ``tf.nn.lrn(depth_radius=4, bias=1, alpha=0.001/9, beta=0.75)``
    exactly: PyTorch divides ``alpha`` by the window size (9), TF does not, hence ``alpha=0.001`` here. They keep
    zeros at zero, so they do not change activation sparsity. ``lrn=False`` replaces them with ``nn.Identity``.
    An ``AdaptiveAvgPool2d(8)`` before the flatten is the identity for 32x32 inputs.

    Args:
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: conv channels become ``ceil(c * width_mult)``.
        scale_hidden_fc: Also scale the hidden FC widths (384, 192) by ``width_mult``.
        lrn: Use the local response normalisation layers of the original model.
        dropout: Dropout probability after ``fc1`` (slim: keep_prob 0.5).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        scale_hidden_fc: bool = True,
        lrn: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        w = check_width_mult(width_mult)
        c = scale_channels(64, w)
        h1, h2 = (scale_channels(384, w), scale_channels(192, w)) if scale_hidden_fc else (384, 192)
        self.conv1 = nn.Conv2d(in_channels, c, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.norm1 = nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0) if lrn else nn.Identity()
        self.conv2 = nn.Conv2d(c, c, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.norm2 = nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0) if lrn else nn.Identity()
        self.pool2 = nn.MaxPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.fc1 = nn.Linear(c * 8 * 8, h1)
        self.relu3 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(h1, h2)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(h2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.relu1(self.conv1(x))))
        x = self.pool2(self.norm2(self.relu2(self.conv2(x))))
        x = torch.flatten(self.pool(x), 1)
        x = self.drop1(self.relu3(self.fc1(x)))
        x = self.relu4(self.fc2(x))
        return self.fc(x)


class AlexNetCifar(nn.Module):
    """AlexNet adapted to CIFAR as described by Ye et al. (2019), section 5.

    The paper changes the first two convs to 3x3 kernels with padding 2 and stride 1 and resizes FC-1/FC-2 to
    4096x2048 and 2048x2048. FC-1's 4096 inputs (= 256 x 4 x 4) pin down the pooling: 2x2 max-pools with stride 2
    after conv1, conv2 and conv5 (32 -> 34 -> 17 -> 19 -> 9 -> 9 -> 4); AlexNet's overlapping 3x3/2 pools would
    give 256 x 3 x 3. The other convs are AlexNet's (3x3, 384-256-256, padding 1); widths 64-192 follow
    torchvision's single-tower AlexNet. Conv-ReLU blocks without BN, as the paper states; ``batch_norm=True``
    inserts BN after every conv. Dropout before ``fc1`` and ``fc2`` as in AlexNet.

    Layers: ``conv1``..``conv5``, ``fc1`` (4096->2048), ``fc2`` (2048->2048), ``fc``. An
    ``AdaptiveAvgPool2d(4)`` before the flatten is the identity for 32x32 inputs.

    Args:
        num_classes: Output classes.
        in_channels: Input image channels.
        width_mult: Depth multiplier: conv channels become ``ceil(c * width_mult)``.
        scale_hidden_fc: Also scale the hidden FC width (2048) by ``width_mult``.
        batch_norm: Add BatchNorm after every conv (convs then have no bias).
        dropout: Dropout probability before ``fc1`` and ``fc2``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        scale_hidden_fc: bool = True,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        w = check_width_mult(width_mult)
        widths = [scale_channels(c, w) for c in (64, 192, 384, 256, 256)]
        hidden = scale_channels(2048, w) if scale_hidden_fc else 2048
        paddings = (2, 2, 1, 1, 1)
        cin = in_channels
        for i, (cout, pad) in enumerate(zip(widths, paddings), start=1):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, kernel_size=3, padding=pad, bias=not batch_norm))
            if batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
            self.add_module(f"relu{i}", nn.ReLU())
            if i in (1, 2, 5):
                self.add_module(f"pool{i}", nn.MaxPool2d(2))
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(cin * 4 * 4, hidden)
        self.relu6 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu7 = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)
        self._batch_norm = batch_norm
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 6):
            x = getattr(self, f"conv{i}")(x)
            if self._batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"relu{i}")(x)
            if i in (1, 2, 5):
                x = getattr(self, f"pool{i}")(x)
        x = torch.flatten(self.pool(x), 1)
        x = self.relu6(self.fc1(self.drop1(x)))
        x = self.relu7(self.fc2(self.drop2(x)))
        return self.fc(x)


@register_model(first_conv="conv1", classifier="fc", input_size=(1, 28, 28), num_classes=10)
def lenet5(num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """LeNet-5 for MNIST-shaped input (1x28x28). See :class:`LeNet5` for ``kwargs``.

    Example:
        >>> model = lenet5()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return LeNet5(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(1, 28, 28), num_classes=10)
def lenet_slim(num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """TF-slim's LeNet (TensorQuant's MNIST model). See :class:`LeNetSlim` for ``kwargs``.

    Example:
        >>> lenet_slim()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return LeNetSlim(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def cifarnet(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """TF-slim CifarNet (TensorQuant's CIFAR-10 model). See :class:`CifarNet` for ``kwargs``.

    Example:
        >>> cifarnet()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarNet(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)


@register_model(first_conv="conv1", classifier="fc", input_size=(3, 32, 32), num_classes=10)
def alexnet_cifar(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """AlexNet for CIFAR as in Ye et al. (2019). See :class:`AlexNetCifar` for ``kwargs``.

    Example:
        >>> alexnet_cifar()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return AlexNetCifar(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, **kwargs)
