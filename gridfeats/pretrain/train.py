"""``gridfeats pretrain METHOD --data SRC --out RUN_DIR``: the training loop around a method.

The loop is a thin adapter kept apart from the methods so it can move onto the project's training
engine (``gridfeats/engine/``, not on main yet when this was written): it only builds the data,
calls ``set_progress`` + ``train_step`` per batch, and writes checkpoints, ``metrics.jsonl`` and
``curves.png``.

Determinism (kill -9 + ``--resume`` = an uninterrupted run, on CPU): the epoch's image order comes
from a generator seeded by (seed, epoch); each image's augmentation from a generator seeded by
(seed, epoch, index) inside ``fork_rng``, so workers and restarts draw the same views; the
checkpoint (written atomically every ``--ckpt-every`` steps and at each epoch end) holds the whole
method state (online and momentum/teacher nets, queue, center), optimizer, scaler, the global torch
RNG and the position inside the epoch, and a resumed run skips the batches already done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from gridfeats.data.image_io import ImageReadError, read_image
from gridfeats.extract.sources import SourceError, list_images
from gridfeats.pretrain import METHODS, build_method
from gridfeats.pretrain.augment import eval_transform, views_transform
from gridfeats.pretrain.base import PretrainError, PretrainMethod
from gridfeats.pretrain.monitors import collapse_score, knn_top1, output_std

#: gridfeats/cli.py parses this command's options and KEY=VALUE pairs intermixed
INTERMIXED_ARGS = True
CHECKPOINT = "checkpoint.pth"
FORMAT = "gridfeats-pretrain"
#: a collapse warning is printed when output_std * sqrt(d) falls under this
COLLAPSE_THRESHOLD = 0.85
#: base lr per 256 images (the linear scaling rule lr = base * batch / 256 of every recipe),
#: (ResNet, ViT)
BASE_LR = {
    "simsiam": (0.05, None),
    "mocov2": (0.03, None),
    "mocov3": (0.6, 1.5e-4),
    "mae": (None, 1.5e-4),
    "dino": (0.03, 5e-4),
}


# ------------------------------------------------------------------------------------- data
class ImageViews(Dataset):
    """Images decoded by the project's reader, each augmented into the method's views."""

    def __init__(self, items, transform, seed: int):
        self.items, self.transform, self.seed, self.epoch = items, transform, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            img = torch.from_numpy(read_image(item.path).copy()).permute(2, 0, 1).contiguous()
        except ImageReadError as e:
            return None, item.image_id, str(e)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % (1 << 62))
            return self.transform(img), item.image_id, None


def _collate(samples):
    good = [s[0] for s in samples if s[0] is not None]
    bad = [(s[1], s[2]) for s in samples if s[0] is None]
    views = [torch.stack([g[v] for g in good]) for v in range(len(good[0]))] if good else []
    return views, bad


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]  # drop_last


def labelled_images(folder: str) -> Tuple[list, torch.Tensor, List[str]]:
    """Images of a folder whose first-level sub-folders are the classes."""
    items = [it for it in list_images(folder) if "/" in it.image_id]
    classes = sorted({it.image_id.split("/")[0] for it in items})
    if len(classes) < 2:
        raise PretrainError(f"{folder}: the kNN monitor needs >= 2 class sub-folders")
    labels = torch.tensor([classes.index(it.image_id.split("/")[0]) for it in items])
    return items, labels, classes


def _eval_batches(items, size: int, batch: int = 64) -> List[torch.Tensor]:
    tf = eval_transform(size)
    out, cur = [], []
    for it in items:
        try:
            cur.append(tf(torch.from_numpy(read_image(it.path).copy()).permute(2, 0, 1)))
        except ImageReadError:
            continue
        if len(cur) == batch:
            out.append(torch.stack(cur))
            cur = []
    if cur:
        out.append(torch.stack(cur))
    return out


# ------------------------------------------------------------------------------- checkpoints
def backbone_tensors(m: PretrainMethod) -> Dict[str, torch.Tensor]:
    """The backbone with this project's key names: Detectron2's for ResNets (``stem.conv1``,
    ``res2..5``, ``convK.norm``, ``shortcut``; heads and ``num_batches_tracked`` dropped), timm's
    for ViTs (heads, decoder and ``mask_token`` dropped)."""
    state = m.backbone().state_dict()
    if "patch_embed.proj.weight" in state:
        skip = ("head.", "decoder_", "mask_token")
        return {k: v.clone() for k, v in state.items() if not k.startswith(skip)}
    out = {}
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if not k.startswith("layer"):
            k = "stem." + k.replace("bn1", "conv1.norm")
        else:
            stage, rest = k.split(".", 1)
            rest = rest.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
            for i in (1, 2, 3):
                rest = rest.replace(f"bn{i}", f"conv{i}.norm")
            k = f"res{int(stage[5:]) + 1}.{rest}"
        out[k] = v.clone()
    return out


#: what every recipe feeds its nets: RGB, ImageNet mean/std, torchvision's stride on the 3x3
RESNET_INPUT = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}
_POS = {
    "mocov3": ("sincos-rows-first", "bicubic"),
    "mae": ("sincos-cols-first", "bicubic"),
    "dino": ("learned", "dino"),
}


def recorded_config(m: PretrainMethod) -> Dict[str, Any]:
    """The config keys ``convert-backbone`` (format gridfeats-pretrain) needs to rebuild the
    backbone as trained: input convention, and for ViTs the sizes, heads (shapes cannot tell them)
    and the position-table rule of the method's repo (docs/backbones.md)."""
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in RESNET_INPUT.items()}
    net = m.backbone()
    if not hasattr(net, "patch_embed"):
        return cfg
    del cfg["MODEL.RESNETS.STRIDE_IN_1X1"]
    kind, interp = _POS[m.name]
    proj = net.patch_embed.proj.weight
    cfg.update(
        {
            "MODEL.VIT.PATCH_SIZE": int(proj.shape[-1]),
            "MODEL.VIT.EMBED_DIM": int(proj.shape[0]),
            "MODEL.VIT.DEPTH": len(net.blocks),
            "MODEL.VIT.NUM_HEADS": int(net.blocks[0].attn.num_heads),
            "MODEL.VIT.MLP_RATIO": net.blocks[0].mlp.fc1.out_features / proj.shape[0],
            "MODEL.VIT.LN_EPS": 1e-6,
            "MODEL.VIT.PRETRAIN_GRID": int(round(math.sqrt(net.pos_embed.shape[1] - 1))),
            "MODEL.VIT.POS_EMBED": kind,
            "MODEL.VIT.POS_INTERP": interp,
        }
    )
    return cfg


def save_checkpoint(path: Path, m: PretrainMethod, meta: Dict[str, Any]) -> None:
    obj = {
        "format": FORMAT,
        "method": m.name,
        "arch": m.arch,
        "model": backbone_tensors(m),
        "config": recorded_config(m),
        "method_state": m.state_dict(),
        "optimizer": m.optimizer.state_dict(),
        "scaler": m.scaler.state_dict() if m.scaler is not None else None,
        "rng": torch.get_rng_state(),
        **meta,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ the run
def _parse_overrides(pairs: List[str]) -> Dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PretrainError(f"expected KEY=VALUE, got {pair!r}")
        key, text = pair.split("=", 1)
        low = text.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        try:
            out[key] = int(text)
        except ValueError:
            try:
                out[key] = float(text)
            except ValueError:
                out[key] = text
    return out


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.lines = 0  # rows in metrics.jsonl; a checkpoint records it, a resume truncates to it
        self.rank, self.world = 0, 1

    def log(self, row: Dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.lines += 1

    def _truncate_metrics(self, lines: int) -> None:
        text = self.metrics_path.read_text() if self.metrics_path.exists() else ""
        kept = text.splitlines(keepends=True)[:lines]
        if self.rank == 0:
            self.metrics_path.write_text("".join(kept))
        self.lines = len(kept)

    def monitors(self, m: PretrainMethod, epoch: int, step: int, knn) -> Dict[str, Any]:
        """output_std on the fixed monitor images in training mode (BN on batch statistics, as
        the paper measures it on training outputs) with the BN statistics and the RNG restored
        afterwards, so monitoring never changes the run; kNN on eval-mode backbone features."""
        row: Dict[str, Any] = {"epoch": epoch, "step": step}
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        m.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            outs = torch.cat([m.monitor_output(b.to(m._device)) for b in self.monitor_batches])
        with torch.no_grad():
            for k, v in m.named_buffers():
                v.copy_(buffers[k])
        row["output_std"], row["output_dim"] = output_std(outs.cpu()), int(outs.shape[1])
        m.eval()
        with torch.no_grad():
            if knn is not None:
                (tr, trl), (va, val) = knn
                ftr = torch.cat([m.features(b.to(m._device)).cpu() for b in tr])
                fva = torch.cat([m.features(b.to(m._device)).cpu() for b in va])
                row["knn_top1"] = knn_top1(ftr, trl[: len(ftr)], fva, val[: len(fva)])
            else:
                row["knn_top1"] = None
        m.train()
        score = collapse_score(row["output_std"], row["output_dim"])
        row["collapse_score"] = score
        if score < self.args.collapse_threshold and step > 0:  # init values are not warned about
            warnings.warn(
                f"collapse monitor: output_std*sqrt(d) = {score:.3f} < "
                f"{self.args.collapse_threshold} at "
                f"epoch {epoch} (outputs are concentrating; healthy runs stay near 1)",
                stacklevel=1,
            )
        m.train()
        return row

    def _setup_distributed(self) -> str:
        """torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU; returns the device."""
        device = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                device = f"cuda:{torch.cuda.current_device()}"
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.args.batch_size % self.world:
                raise PretrainError(
                    f"--batch-size {self.args.batch_size} (global) is not divisible by "
                    f"{self.world} ranks"
                )
        return device

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _mean_loss(self, loss: float) -> float:
        if self.world == 1:
            return loss
        import torch.distributed as dist

        t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / self.world)

    def _save(self, path: Path, m: PretrainMethod, meta: Dict[str, Any]) -> None:
        if self.rank == 0:
            save_checkpoint(path, m, meta)
        self._barrier()

    def main(self) -> int:
        a = self.args
        device = self._setup_distributed()
        torch.manual_seed(a.seed)
        items = list_images(a.data, a.image_root)
        if len(items) < a.batch_size:
            raise PretrainError(f"{len(items)} images is fewer than one batch of {a.batch_size}")
        hp = _parse_overrides(a.overrides)
        if a.lr is not None:
            hp["lr"] = a.lr * a.batch_size / 256
        elif "lr" not in hp:
            vit = (a.arch or ("vit" if a.method in ("mae", "dino") else "resnet")).startswith("vit")
            base = BASE_LR[a.method][1 if vit else 0]
            if base is not None:
                hp["lr"] = base * a.batch_size / 256
        if a.no_stop_grad:
            hp["stop_grad"] = False
        if a.no_predictor:
            hp["predictor"] = False
        default_arch = "vit" if a.method in ("mae", "dino") else "resnet"
        if (a.arch or default_arch).startswith("vit") and a.method != "simsiam":
            hp.setdefault("img_size", a.crop_size)
        ckpt_path = self.out / CHECKPOINT
        resume = a.resume and ckpt_path.exists()
        m = build_method(a.method, arch=a.arch, precision=a.precision, device=device, **hp)
        if self.world > 1 and device.startswith("cuda") and a.method != "mocov2":
            # SyncBN as the repos (MoCo v2 keeps per-GPU BN: that is what its shuffle is for).
            # Parameters are reused by the conversion, so the optimizer stays valid. On CPU
            # torch has no SyncBN: BN statistics stay per rank.
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
        start_epoch, start_batch, step = 0, 0, 0
        if resume:
            obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            m.load_state_dict(obj["method_state"])
            m.optimizer.load_state_dict(obj["optimizer"])
            if m.scaler is not None and obj.get("scaler"):
                m.scaler.load_state_dict(obj["scaler"])
            torch.set_rng_state(obj["rng"])
            start_epoch, start_batch, step = obj["epoch"], obj["epoch_batch"], obj["step"]
            self._truncate_metrics(obj["metrics_lines"])
        elif self.metrics_path.exists() and self.rank == 0:
            self.metrics_path.unlink()
        n_local = a.overrides_local_crops
        transform = views_transform(a.method, a.crop_size, n_local)
        data = ImageViews(items, transform, a.seed)
        self.monitor_batches = _eval_batches(items[: a.monitor_images], a.crop_size)
        knn = None
        if a.knn_train and a.knn_val:
            tr, trl, _ = labelled_images(a.knn_train)
            va, val, _ = labelled_images(a.knn_val)
            knn = ((_eval_batches(tr, a.crop_size), trl), (_eval_batches(va, a.crop_size), val))
        if not resume:
            self.log(self.monitors(m, 0, 0, knn))
        local = a.batch_size // self.world  # each rank takes its contiguous share of a batch
        iters = len(items) // a.batch_size
        bad_log = self.out / "bad_images.jsonl"
        from tqdm import tqdm

        for epoch in range(start_epoch, a.epochs):
            data.epoch = epoch
            batches = epoch_batches(len(items), a.batch_size, a.seed, epoch)
            first = start_batch if epoch == start_epoch else 0
            # Own generator: a DataLoader otherwise draws its worker base seed from the global RNG
            # when iterated, which a resumed run would do at another point of the stream.
            loader = DataLoader(
                data,
                batch_sampler=[
                    b[self.rank * local : (self.rank + 1) * local] for b in batches[first:]
                ],
                num_workers=a.workers,
                collate_fn=_collate,
                generator=torch.Generator().manual_seed(a.seed * 7919 + epoch),
            )
            bar = tqdm(
                loader,
                total=iters - first,
                desc=f"{a.method} epoch {epoch}",
                disable=not sys.stderr.isatty() and not a.progress,
            )
            for b, (views, bad) in enumerate(bar, start=first):
                for image_id, reason in bad:
                    with open(bad_log, "a") as f:
                        f.write(json.dumps({"image_id": image_id, "reason": reason}) + "\n")
                if not views or (a.method == "mocov2" and len(views[0]) != local):
                    continue  # the queue needs whole batches
                m.set_progress(epoch + b / iters, a.epochs, iters)
                loss = self._mean_loss(m.train_step(views))
                if not math.isfinite(loss):
                    raise PretrainError(f"loss is {loss} at epoch {epoch} step {step}; stopping")
                step += 1
                lr = m.optimizer.param_groups[0]["lr"]
                self.log({"epoch": epoch, "step": step, "loss": loss, "lr": lr})
                bar.set_postfix(loss=f"{loss:.4f}")
                if a.ckpt_every and step % a.ckpt_every == 0 and b + 1 < iters:
                    meta = {"epoch": epoch, "epoch_batch": b + 1, "step": step}
                    self._save(ckpt_path, m, dict(meta, metrics_lines=self.lines))
            row = self.monitors(m, epoch + 1, step, knn)
            self.log(row)
            meta = {"epoch": epoch + 1, "epoch_batch": 0, "step": step}
            self._save(ckpt_path, m, dict(meta, metrics_lines=self.lines))
        if self.rank != 0:
            return 0
        if a.export_layout == "upstream":
            torch.save(m.upstream_state_dict(), self.out / "upstream_checkpoint.pth")
        from gridfeats.pretrain.curves import plot_curves

        plot_curves(self.metrics_path, self.out / "curves.png")
        return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--data", required=True, help="folder, COCO json or list of image paths")
    parser.add_argument("--image-root", default=None, help="root for a COCO json or a path list")
    parser.add_argument("--out", required=True, help="run folder (checkpoint, metrics, curves)")
    parser.add_argument(
        "--arch", default=None, help="resnet18|resnet50|vit_tiny|vit_small|vit_base"
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base lr per 256 images (linear scaling rule); default: the recipe's",
    )
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pth")
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps")
    parser.add_argument("--knn-train", default=None, help="labelled folder (class = sub-folder)")
    parser.add_argument("--knn-val", default=None)
    parser.add_argument(
        "--monitor-images",
        type=int,
        default=256,
        help="training images the output_std monitor reads (one fixed set)",
    )
    parser.add_argument(
        "--collapse-threshold",
        type=float,
        default=COLLAPSE_THRESHOLD,
        help="warn when output_std*sqrt(d) falls under this (default 0.85; checked at epoch ends)",
    )
    parser.add_argument("--no-stop-grad", action="store_true", help="SimSiam ablation")
    parser.add_argument("--no-predictor", action="store_true", help="SimSiam ablation")
    parser.add_argument("--export-layout", choices=("upstream",), default=None)
    parser.add_argument("--local-crops", dest="overrides_local_crops", type=int, default=8)
    parser.add_argument("--progress", action="store_true", help="tqdm bar even without a tty")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="method hyper-parameters, e.g. ema=0.99 temperature=0.2",
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        return Run(args).main()
    except (PretrainError, SourceError) as e:
        print(f"gridfeats pretrain: error: {e}", file=sys.stderr)
        return 2


__all__ = ["add_arguments", "run", "backbone_tensors", "time"]
