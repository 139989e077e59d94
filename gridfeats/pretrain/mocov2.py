"""MoCo v2 (Chen et al., arXiv:2003.04297) as facebookresearch/moco trains it (``--mlp --cos``).

Query encoder ``encoder_q`` and momentum key encoder ``encoder_k`` (torchvision ResNet, fc replaced
by Linear-ReLU-Linear to 128-d), a FIFO ``queue`` [dim, K] of l2-normalised keys and its
``queue_ptr``. Per step, in the repo's order: queries; momentum update of the key encoder's
parameters (its BN statistics come from its own forward); keys from a batch-shuffled copy of the
key view (shuffling BN), un-shuffled; InfoNCE over 1 positive + K queue negatives at temperature T;
enqueue the keys; SGD step. On one process the shuffle is a permutation inside the batch (BN is
permutation-invariant, so it changes nothing but the RNG stream, kept identical to the repo's); with
several processes it is the repo's gather-shuffle-scatter across ranks.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gridfeats.pretrain.base import (
    EncoderCheckpointMethod,
    PretrainError,
    concat_all_gather,
    read_obj,
    strip_module,
    world,
)
from gridfeats.pretrain.nets import resnet, resnet_arch_from_state


class MoCoNet(nn.Module):
    """``queue``, ``queue_ptr`` (first, as in the repo), ``encoder_q``, ``encoder_k``"""

    def __init__(self, arch: str, dim: int = 128, K: int = 65536, mlp: bool = True):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.encoder_q = resnet(arch, num_classes=dim)
        self.encoder_k = resnet(arch, num_classes=dim)
        if mlp:
            for enc in (self.encoder_q, self.encoder_k):
                hidden = enc.fc.weight.shape[1]
                enc.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), enc.fc)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data.copy_(pq.data)
            pk.requires_grad = False


class MoCoV2(EncoderCheckpointMethod):
    name = "mocov2"
    encoder_name = "encoder_q"
    hparams = ("lr", "weight_decay", "momentum", "ema", "temperature", "queue_size")

    def __init__(
        self,
        arch: str = "resnet50",
        checkpoint: Optional[Any] = None,
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        ema: float = 0.999,
        temperature: float = 0.2,
        queue_size: int = 65536,
        dim: int = 128,
        mlp: bool = True,
        cos: bool = True,
        precision: str = "fp32",
        device: str = "cpu",
    ):
        super().__init__(arch, precision, device)
        obj = read_obj(checkpoint)
        if obj is not None:
            state = strip_module(obj["state_dict"])
            self.arch = arch = resnet_arch_from_state(state, "encoder_q.")
            dim, queue_size = state["queue"].shape
            mlp = "encoder_q.fc.0.weight" in state
        self.init_lr = self.lr = lr
        self.weight_decay, self.momentum = weight_decay, momentum
        self.ema, self.temperature, self.cos = ema, temperature, cos
        self.model = MoCoNet(arch, dim, queue_size, mlp)
        self._finish(obj)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.model.parameters(), self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def apply_hparams(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"], group["momentum"] = self.lr, self.momentum
            group["weight_decay"] = self.weight_decay

    def set_progress(self, epoch: float, epochs: int, iters_per_epoch: int = 0) -> None:
        """``--cos``: cosine per whole epoch (main_moco.py ``adjust_learning_rate``)."""
        super().set_progress(epoch, epochs)
        if self.cos:
            self.lr = self.init_lr * 0.5 * (1.0 + math.cos(math.pi * int(epoch) / epochs))
        self.apply_hparams()

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.ema
        for pq, pk in zip(self.model.encoder_q.parameters(), self.model.encoder_k.parameters()):
            pk.data = pk.data * m + pq.data * (1.0 - m)

    @torch.no_grad()
    def _shuffled_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys of a batch shuffled across all ranks, returned in the original order."""
        rank, size = world()
        gathered = concat_all_gather(im_k)
        idx_shuffle = torch.randperm(gathered.shape[0]).to(im_k.device)
        if size > 1:
            dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        k = self.model.encoder_k(gathered[idx_shuffle.view(size, -1)[rank]])
        k = F.normalize(k, dim=1)
        return concat_all_gather(k)[idx_unshuffle.view(size, -1)[rank]]

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys)
        batch = keys.shape[0]
        queue = self.model.queue
        ptr = int(self.model.queue_ptr)
        if queue.shape[1] % batch:
            raise PretrainError(
                f"queue_size {queue.shape[1]} must be a multiple of the global batch {batch}"
            )
        queue[:, ptr : ptr + batch] = keys.T
        self.model.queue_ptr[0] = (ptr + batch) % queue.shape[1]

    def _step(self, views: List[torch.Tensor], **kwargs) -> torch.Tensor:
        im_q, im_k = views
        with self.autocast():
            q = F.normalize(self.model.encoder_q(im_q), dim=1)
            with torch.no_grad():
                self._momentum_update()
                k = self._shuffled_keys(im_k)
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", q, self.model.queue.clone().detach())
            logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
            labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            self._dequeue_and_enqueue(k)
            loss = F.cross_entropy(logits, labels)
        self.backward_and_step(loss)
        return loss.detach()
