"""Independent, straightforward implementations of the five methods' training steps, written from
the papers' pseudocode (SimSiam Alg. 1, MoCo Alg. 1, MoCo v3 Alg. 1, MAE Sec. 3, DINO Alg. 1) for
the tests to hold ``gridfeats.pretrain`` to. Only the module *names* follow the repos (so a state
dict moves between the two); the code is written the obvious way, as one function per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


# ----------------------------------------------------------------------------------- networks
def resnet18_with(fc: nn.Module) -> nn.Module:
    net = torchvision.models.resnet18(weights=None)
    net.fc = fc
    return net


def bn_mlp(dims, last_bn=True, last_bias=False):
    """Linear-BN-ReLU ... Linear (+ BN without affine); indices as the repos' Sequentials."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last and last_bias))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU()]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


class TinyBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            self.attn.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        a = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """cls token + patch tokens + position table, pre-norm blocks, final norm; returns [cls]."""

    def __init__(self, img=32, patch=8, d=32, depth=2, heads=4, learned_pos=False):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.02, requires_grad=learned_pos)
        self.blocks = nn.ModuleList(TinyBlock(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Identity()

    def tokens(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.tokens(x)[:, 0])


def ema_(target: nn.Module, online: nn.Module, m: float) -> None:
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.data = t.data * m + o.data * (1.0 - m)


# ------------------------------------------------------------------------------------- steps
def simsiam_step(net, opt, x1, x2):
    def D(p, z):  # negative cosine with stop-gradient on z
        return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(1).mean()

    z1, z2 = net.encoder(x1), net.encoder(x2)
    p1, p2 = net.predictor(z1), net.predictor(z2)
    loss = D(p1, z2) / 2 + D(p2, z1) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def moco_step(net, opt, x_q, x_k, m, t):
    q = F.normalize(net.encoder_q(x_q), dim=1)
    ema_(net.encoder_k, net.encoder_q, m)
    with torch.no_grad():
        perm = torch.randperm(len(x_k))  # shuffling BN (one process: a permutation in the batch)
        k = F.normalize(net.encoder_k(x_k[perm]), dim=1)[torch.argsort(perm)]
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ net.queue.clone()
    loss = F.cross_entropy(torch.cat([l_pos, l_neg], 1) / t, torch.zeros(len(q), dtype=torch.long))
    ptr = int(net.queue_ptr)
    net.queue[:, ptr : ptr + len(k)] = k.T
    net.queue_ptr[0] = (ptr + len(k)) % net.queue.shape[1]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def mocov3_step(net, opt, x1, x2, m, t):
    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
        return F.cross_entropy(logits, torch.arange(len(q))) * 2 * t

    q1, q2 = net.predictor(net.base_encoder(x1)), net.predictor(net.base_encoder(x2))
    ema_(net.momentum_encoder, net.base_encoder, m)
    with torch.no_grad():
        k1, k2 = net.momentum_encoder(x1), net.momentum_encoder(x2)
    loss = ctr(q1, k2) + ctr(q2, k1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def mae_step(net, opt, img, noise, mask_ratio, patch):
    b, _, h, w = img.shape
    gh, gw = h // patch, w // patch
    target = (
        img.reshape(b, 3, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
    )
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    keep = int(gh * gw * (1 - mask_ratio))
    order = noise.argsort(1)
    kept = order[:, :keep]
    x = net.patch_embed.proj(img).flatten(2).transpose(1, 2) + net.pos_embed[:, 1:]
    x = x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(net.cls_token + net.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
    for blk in net.blocks:
        x = blk(x)
    x = net.decoder_embed(net.norm(x))
    full = net.mask_token.expand(b, gh * gw, -1).clone()
    full = full.scatter(1, kept[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
    x = torch.cat([x[:, :1], full], 1) + net.decoder_pos_embed
    for blk in net.decoder_blocks:
        x = blk(x)
    pred = net.decoder_pred(net.decoder_norm(x))[:, 1:]
    masked = torch.ones(b, gh * gw)
    masked.scatter_(1, kept, 0.0)
    loss = (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


class DinoHeadRef(nn.Module):
    def __init__(self, d, out, hidden=16, bottleneck=8):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def dino_step(student, teacher, center, opt, crops, tps, tpt, m, c_m, clip, freeze_last):
    def run(net, views):  # one backbone pass per crop size
        feats = []
        for size in dict.fromkeys(v.shape[-1] for v in views):
            feats.append(net.backbone(torch.cat([v for v in views if v.shape[-1] == size])))
        return net.head(torch.cat(feats))

    t_out = run(teacher, crops[:2]).detach()
    s_out = run(student, crops).chunk(len(crops))
    t_prob = F.softmax((t_out - center) / tpt, dim=-1).chunk(2)
    losses = [
        -(t_prob[i] * F.log_softmax(s_out[v] / tps, dim=-1)).sum(-1).mean()
        for i in range(2)
        for v in range(len(crops))
        if v != i
    ]
    loss = sum(losses) / len(losses)
    new_center = center * c_m + t_out.mean(0, keepdim=True) * (1 - c_m)
    opt.zero_grad()
    loss.backward()
    for p in student.parameters():
        if p.grad is not None:
            norm = p.grad.norm()
            if clip / (norm + 1e-6) < 1:
                p.grad.mul_(clip / (norm + 1e-6))
    if freeze_last:
        student.head.last_layer.weight_v.grad = None
    opt.step()
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(m).add_((1 - m) * s)
    return loss.item(), new_center


def lars_step_(params, lr, wd, momentum, state, eta=0.001):
    """LARS: trust ratio eta*||w||/||g + wd w|| for >1-D weights, plain SGD otherwise."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            g = p.grad
            if p.ndim > 1:
                g = g + wd * p
                wn, gn = p.norm(), g.norm()
                if wn > 0 and gn > 0:
                    g = g * (eta * wn / gn)
            buf = state.setdefault(id(p), torch.zeros_like(p))
            buf.mul_(momentum).add_(g)
            p.sub_(lr * buf)


__all__ = ["math"]
