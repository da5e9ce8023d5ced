"""Handwritten digits: a tiny, fast data set and CNN for qatkit's examples and tests.

scikit-learn ships the UCI digits (1797 8x8 grey images, 10 classes) inside the package, so
nothing is downloaded.  The images are upsampled to 16x16 (bilinear) and normalized to
[-1, 1], the input range NPU toolchains recommend (a fixed input scale of 1/128 then covers it).

``DigitsNet`` has the shapes quantization cares about: conv+bn+relu, a residual block with an
explicit ``out + identity`` followed by a ReLU, global average pooling and a linear head.  Every
call site has its own module (no shared ReLU), and the model starts with a ``QuantStub`` and ends
with a ``DeQuantStub`` (identities in float).

Example::

    >>> data = load_digits_data()
    >>> torch.manual_seed(SEED)
    >>> model = train_float(DigitsNet(), data)
    >>> evaluate(model, (data.test_x, data.test_y)) > 0.97
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import qatkit
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SEED", "DigitsData", "load_digits_data", "batches", "DigitsNet", "train_float",
           "evaluate", "torch_threads"]

#: the seed of the split, the initialization and the shuffling of every example
SEED = 0
IMAGE_SIZE = 16
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The digits split into train and test tensors.

    ``*_x`` are float32 ``[N, 1, 16, 16]`` in [-1, 1]; ``*_y`` are int64 labels ``[N]``.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def __repr__(self) -> str:
        return f"DigitsData(train={len(self.train_y)}, test={len(self.test_y)})"


def load_digits_data(test_fraction: float = 0.2, seed: int = SEED) -> DigitsData:
    """Load scikit-learn's digits, upsample to 16x16, normalize to [-1, 1], split (stratified).

    Args:
        test_fraction: share of the 1797 images kept for testing.
        seed: seed of the split; the same seed always gives the same split.

    Returns:
        A :class:`DigitsData` (1437 train / 360 test images with the defaults).

    Example::

        >>> data = load_digits_data()
        >>> data.train_x.shape, float(data.train_x.min()), float(data.train_x.max())
        (torch.Size([1437, 1, 16, 16]), -1.0, 1.0)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                           align_corners=False)
    images = (images / 8.0 - 1.0).clamp_(-1.0, 1.0)  # 0..16 -> [-1, 1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed,
        stratify=labels.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DigitsData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def batches(x: Tensor, y: Tensor, batch_size: int = 64, shuffle: bool = False,
            seed: int = SEED) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` mini-batches; with ``shuffle`` the order depends only on ``seed``.

    Example::

        >>> xb, yb = next(batches(torch.zeros(10, 1), torch.arange(10), batch_size=4))
        >>> yb
        tensor([0, 1, 2, 3])
    """
    if shuffle:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(len(y))
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


class DigitsNet(nn.Module):
    """A small residual CNN for 1x16x16 digits (about 10k parameters).

    stem (conv-bn-relu) -> residual block (conv-bn-relu, conv-bn, ``+ identity``, relu)
    -> downsampling conv-bn-relu -> global average pool -> linear head.

    Args:
        width: channels of the stem and the residual block (the last conv doubles them).
        num_classes: outputs of the linear head.

    Example::

        >>> DigitsNet()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        # inputs are normalized to [-1, 1]: a fixed input scale of 1/128 covers them
        self.quant = qatkit.QuantStub(scale=1 / 128)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        # residual block
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU()
        # downsample, pool, classify
        self.conv4 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.relu4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.dequant = qatkit.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        identity = out
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        out = self.relu3(out)
        out = self.relu4(self.bn4(self.conv4(out)))
        out = torch.flatten(self.pool(out), 1)
        return self.dequant(self.fc(out))


def train_float(model: nn.Module, data: DigitsData, epochs: int = 12, lr: float = 1e-2,
                batch_size: int = 64, seed: int = SEED) -> nn.Module:
    """Train ``model`` in float with Adam and a one-cycle learning rate schedule.

    The batch order depends only on ``seed``, so the result depends only on the model's initial
    weights and the arguments (seed torch before building the model).  Takes a few seconds for
    the default 12 epochs on two CPU cores.

    Args:
        model: a freshly built :class:`DigitsNet` (or any model with the same input/output).
        data: the data from :func:`load_digits_data`.
        epochs: passes over the training set.
        lr: Adam's peak learning rate.
        batch_size: mini-batch size.
        seed: seed of the shuffling (epoch k uses ``seed + k``).

    Returns:
        ``model`` itself, trained and in eval mode.

    Example::

        >>> torch.manual_seed(SEED)
        >>> model = train_float(DigitsNet(), load_digits_data(), epochs=1)
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data.train_y) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        for x, y in batches(data.train_x, data.train_y, batch_size, shuffle=True,
                            seed=seed + epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)`` tensors or on ``(x, y)`` batches.

    The model's train/eval mode is restored afterwards.

    Args:
        model: a classifier returning logits ``[N, num_classes]``.
        data: a pair of tensors ``(x, y)``, or an iterable of ``(x, y)`` batches such as a
            ``DataLoader``.
        batch_size: batch size used when ``data`` is a pair of tensors.

    Returns:
        The fraction of correctly classified samples, in [0, 1].

    Example::

        >>> evaluate(model, (data.test_x, data.test_y))
        0.98...
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = batches(data[0], data[1], batch_size)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in data:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate got no samples: pass (x, y) tensors or non-empty batches")
    return correct / total


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous number.

    DigitsNet is tiny: one thread trains it as fast as several, gives the same numbers whatever
    the machine's core count, and does not stall when other processes keep the cores busy.

    Example::

        >>> with torch_threads(1):
        ...     model = train_float(DigitsNet(), load_digits_data())
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
