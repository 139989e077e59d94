"""The papers' augmentations in torchvision.transforms.v2, on the decoded uint8 image.

Parameters are the repos' (``../shared/docs/ssl-backbones.md`` section 6): random resized crop,
colour jitter with probability 0.8, grayscale 0.2, Gaussian blur sigma in [0.1, 2] (kernel
about 10 %
of the crop, as torchvision needs an odd size where PIL's radius blur needs none), solarisation at
128, horizontal flip 0.5, then ImageNet mean/std. DINO adds 96 px local crops (scaled with
``size``: ``size * 96 / 224``).
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blur(size: int, p: float) -> T.Transform:
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


def _finish() -> List[T.Transform]:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)]


def _view(size, scale, jitter, blur_p, solarize_p, interpolation=InterpolationMode.BILINEAR):
    ops: List[T.Transform] = [
        T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)
    ]
    if jitter is not None:
        ops += [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
    if blur_p:
        ops.append(_blur(size, blur_p))
    if solarize_p:
        ops.append(T.RandomSolarize(128, p=solarize_p))
    ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + _finish())


def views_transform(method: str, size: int = 224, local_crops: int = 8) -> Callable:
    """A callable image (uint8 [3,H,W]) -> list of normalised float views for ``method``."""
    if method in ("simsiam", "mocov2"):
        aug = _view(size, (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.5, 0)
        return lambda img: [aug(img), aug(img)]
    if method == "mocov3":
        a1 = _view(size, (0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 1.0, 0)
        a2 = _view(size, (0.08, 1.0), (0.4, 0.4, 0.2, 0.1), 0.1, 0.2)
        return lambda img: [a1(img), a2(img)]
    if method == "mae":
        aug = _view(size, (0.2, 1.0), None, 0, 0, InterpolationMode.BICUBIC)
        return lambda img: [aug(img)]
    if method == "dino":
        bic = InterpolationMode.BICUBIC
        jit = (0.4, 0.4, 0.2, 0.1)
        g1 = _view(size, (0.4, 1.0), jit, 1.0, 0, bic)
        g2 = _view(size, (0.4, 1.0), jit, 0.1, 0.2, bic)
        local = _view(max(16, size * 96 // 224), (0.05, 0.4), jit, 0.5, 0, bic)
        return lambda img: [g1(img), g2(img)] + [local(img) for _ in range(local_crops)]
    raise ValueError(f"no augmentation for method {method!r}")


def eval_transform(size: int = 224) -> Callable:
    """Resize the short side to size*256/224, centre crop (the kNN / monitor input)."""
    return T.Compose([T.Resize(size * 256 // 224, antialias=True), T.CenterCrop(size)] + _finish())
