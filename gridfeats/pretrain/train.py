"""``gridfeats pretrain METHOD --data SRC --out RUN_DIR``: a method trained by the project's engine.

The loop is ``gridfeats.engine.Trainer`` (``PretrainTrainer`` overrides ``run_step`` to call the
method's ``set_progress`` + ``train_step`` on ``next_batch()``: the method owns its backward,
optimizer step and momentum / queue / center updates). Everything periodic is a hook: the
engine's ``MetricsWriter`` (``metrics.jsonl`` + tqdm), ``MonitorHook`` (kNN, output_std, the
collapse warning), the engine's ``PeriodicCheckpointer`` (``RUN_DIR/last.pt``, the engine's
training state: the whole method, optimizer, scaler, every RNG, the data position) with the
``gridfeats-pretrain`` export ``RUN_DIR/backbone.pth`` written after each save, and
``RunFilesHook`` (``curves.png``, ``--export-layout upstream``).

Determinism (kill -9 + ``--resume`` = an uninterrupted run, on CPU): the epoch's image order comes
from ``ResumableBatchSampler`` (a function of seed and epoch; a resume skips the done batches
without reading them); each image's views from a generator seeded by (seed, epoch, index) inside
``fork_rng``, so workers and restarts draw the same views; the engine restores the global RNGs
(MoCo's shuffle, DINO's stochastic depth) after positioning the data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from gridfeats.data.image_io import ImageReadError, read_image
from gridfeats.engine import HookBase, ResumableBatchSampler, Trainer, distributed, hooks
from gridfeats.engine.checkpoint import save_atomic, seed_all_rngs
from gridfeats.extract.sources import SourceError, list_images
from gridfeats.pretrain import METHODS, build_method
from gridfeats.pretrain.augment import eval_transform, views_transform
from gridfeats.pretrain.base import PretrainError, PretrainMethod
from gridfeats.pretrain.monitors import collapse_score, knn_top1, output_std

#: gridfeats/cli.py parses this command's options and KEY=VALUE pairs intermixed
INTERMIXED_ARGS = True
#: the engine's training state (resume); the converter-facing export is BACKBONE
CHECKPOINT = hooks.LAST
BACKBONE = "backbone.pth"
UPSTREAM = "upstream_checkpoint.pth"
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


class ViewBatchSampler(ResumableBatchSampler):
    """The engine's resumable batch order, telling the dataset the epoch its views are drawn for
    (the trainer calls ``set_epoch`` before each epoch's iterator is built, workers included)."""

    def __init__(self, dataset: "ImageViews", *args: Any, **kwargs: Any):
        super().__init__(len(dataset), *args, **kwargs)
        self.dataset = dataset

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        super().set_epoch(epoch, skip_batches)
        self.dataset.epoch = epoch


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


def export_backbone(path: Path, m: PretrainMethod, epoch: int, step: int) -> None:
    """``RUN_DIR/backbone.pth``: what ``convert-backbone --format gridfeats-pretrain`` reads:
    ``{"format", "method", "arch", "model"`` (backbone tensors only), ``"config", "epoch",
    "step"}``. Resuming reads the engine's ``last.pt`` instead, which holds the whole method."""
    save_atomic(
        path,
        {
            "format": FORMAT,
            "method": m.name,
            "arch": m.arch,
            "model": backbone_tensors(m),
            "config": recorded_config(m),
            "epoch": epoch,
            "step": step,
        },
    )


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


class PretrainTrainer(Trainer):
    """The engine's loop for a method that owns its whole update.

    ``run_step`` takes one batch from ``next_batch()`` (the engine keeps the data position for
    resume), puts the method's schedules at ``epoch + batch / iters`` and calls ``train_step``.
    The optimizer and grad scaler the engine checkpoints are the method's own; the method averages
    its gradients over ranks itself, so the trainer does not wrap it in DDP.
    """

    def __init__(
        self,
        method: PretrainMethod,
        data_loader: DataLoader,
        *,
        max_epochs: int,
        bad_log: Path,
        whole_batches: Optional[int] = None,
    ) -> None:
        super().__init__(
            method,
            data_loader,
            method.optimizer,
            max_epochs=max_epochs,
            precision=method.precision,
            device=method._device,
            move_batch=False,  # train_step moves its views
            wrap_ddp=False,
        )
        self.scaler = method.scaler  # the one train_step steps with (fp16), checkpointed
        self.method = method
        self.bad_log = bad_log
        self.whole_batches = whole_batches

    def run_step(self) -> None:
        views, bad = self.next_batch()
        if bad and self.rank.is_main:
            with open(self.bad_log, "a") as f:
                for image_id, reason in bad:
                    f.write(json.dumps({"image_id": image_id, "reason": reason}) + "\n")
        self.last_losses = {}
        if not views or (self.whole_batches is not None and len(views[0]) != self.whole_batches):
            return  # MoCo v2's queue takes whole batches: a batch left short is skipped
        m, iters = self.method, self.iters_per_epoch
        m.set_progress(self.epoch + (self.batch_in_epoch - 1) / iters, self.max_epochs, iters)
        loss = m.train_step(views)
        if not math.isfinite(loss):
            raise PretrainError(f"loss is {loss} at epoch {self.epoch} step {self.iter + 1}")
        self.last_losses = {"loss": loss}
        self.last_lr = float(m.optimizer.param_groups[0]["lr"])


class MonitorHook(HookBase):
    """``output_std``/``output_dim``/``collapse_score`` and ``knn_top1`` before the first step and
    at every epoch end, as ``monitor`` records of ``metrics.jsonl``; a warning when the collapse
    score falls under ``threshold``.

    output_std is measured on fixed monitor images in training mode (BN on batch statistics, as
    the paper measures it on training outputs) with the BN statistics and the RNG restored after,
    so monitoring never changes the run; kNN reads eval-mode backbone features. Every rank
    computes (a SyncBN forward is a collective); rank 0 writes.
    """

    def __init__(self, method: PretrainMethod, monitor_batches, knn, threshold: float):
        self.method, self.monitor_batches, self.knn = method, monitor_batches, knn
        self.threshold = threshold

    def measure(self) -> Dict[str, Any]:
        m = self.method
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        m.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            outs = torch.cat([m.monitor_output(b.to(m._device)) for b in self.monitor_batches])
        with torch.no_grad():
            for k, v in m.named_buffers():
                v.copy_(buffers[k])
        row: Dict[str, Any] = {"output_std": output_std(outs.cpu()), "output_dim": outs.shape[1]}
        row["knn_top1"] = None
        if self.knn is not None:
            m.eval()
            with torch.no_grad():
                (tr, trl), (va, val) = self.knn
                ftr = torch.cat([m.features(b.to(m._device)).cpu() for b in tr])
                fva = torch.cat([m.features(b.to(m._device)).cpu() for b in va])
                row["knn_top1"] = knn_top1(ftr, trl[: len(ftr)], fva, val[: len(fva)])
        m.train()
        row["collapse_score"] = collapse_score(row["output_std"], row["output_dim"])
        return row

    def before_train(self) -> None:
        if not self.trainer.resumed:  # the random-init row is written once, by the first start
            self.trainer.log("monitor", self.measure())

    def after_epoch(self) -> None:
        t = self.trainer
        row = self.measure()
        t.log("monitor", row)
        if row["collapse_score"] < self.threshold and t.rank.is_main:
            warnings.warn(
                f"collapse monitor: output_std*sqrt(d) = {row['collapse_score']:.3f} < "
                f"{self.threshold} at epoch {t.epoch} (outputs are concentrating; healthy runs "
                "stay near 1)",
                stacklevel=1,
            )


class RunFilesHook(HookBase):
    """The run folder's other files: ``backbone.pth`` (after every checkpoint, through the
    checkpointer's ``after_save``), and at the end ``curves.png`` and, with ``--export-layout
    upstream``, the reference repo's own layout (``upstream_state_dict()``)."""

    def __init__(self, method: PretrainMethod, out: Path, upstream: bool):
        self.method, self.out, self.upstream = method, out, upstream

    def export(self) -> None:
        t = self.trainer
        if t.rank.is_main:
            export_backbone(self.out / BACKBONE, self.method, t.data_position()["epoch"], t.iter)

    def after_train(self) -> None:
        if not self.trainer.rank.is_main:
            return
        if self.upstream:
            save_atomic(self.out / UPSTREAM, self.method.upstream_state_dict())
        from gridfeats.pretrain.curves import plot_curves

        plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")


def _method_hparams(a: argparse.Namespace) -> Dict[str, Any]:
    hp = _parse_overrides(a.overrides)
    default_arch = "vit" if a.method in ("mae", "dino") else "resnet"
    vit = (a.arch or default_arch).startswith("vit")
    if a.lr is not None:
        hp["lr"] = a.lr * a.batch_size / 256
    elif "lr" not in hp:
        base = BASE_LR[a.method][1 if vit else 0]
        if base is not None:
            hp["lr"] = base * a.batch_size / 256
    if a.no_stop_grad:
        hp["stop_grad"] = False
    if a.no_predictor:
        hp["predictor"] = False
    if vit and a.method != "simsiam":
        hp.setdefault("img_size", a.crop_size)
    return hp


def _knn_sets(a: argparse.Namespace):
    if not (a.knn_train and a.knn_val):
        return None
    tr, trl, _ = labelled_images(a.knn_train)
    va, val, _ = labelled_images(a.knn_val)
    return (_eval_batches(tr, a.crop_size), trl), (_eval_batches(va, a.crop_size), val)


def train_run(a: argparse.Namespace) -> int:
    """Build the method, the data and the trainer with its hooks; train (or resume); 0 when done."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = distributed.RankInfo.from_env()
    device = distributed.resolve_device(a.device or "auto")
    if a.batch_size % rank.world_size:
        raise PretrainError(
            f"--batch-size {a.batch_size} (global) is not divisible by {rank.world_size} ranks"
        )
    distributed.init_process_group(rank, device)
    try:
        return _train(a, out, rank, device)
    finally:
        distributed.destroy_process_group()


def _train(a, out: Path, rank, device: torch.device) -> int:
    seed_all_rngs(a.seed)
    items = list_images(a.data, a.image_root)
    if len(items) < a.batch_size:
        raise PretrainError(f"{len(items)} images is fewer than one batch of {a.batch_size}")
    ckpt_path = out / CHECKPOINT
    resume = a.resume and ckpt_path.exists()
    m = build_method(
        a.method, arch=a.arch, precision=a.precision, device=str(device), **_method_hparams(a)
    )
    if rank.distributed and device.type == "cuda" and a.method != "mocov2":
        # SyncBN as the repos (MoCo v2 keeps per-GPU BN: that is what its shuffle is for).
        # Parameters are reused by the conversion, so the optimizer stays valid. On CPU torch
        # has no SyncBN: BN statistics stay per rank.
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
    local = a.batch_size // rank.world_size  # each rank's share of the global batch
    transform = views_transform(a.method, a.crop_size, a.overrides_local_crops)
    data = ImageViews(items, transform, a.seed)
    sampler = ViewBatchSampler(
        data, local, a.seed, rank=rank.rank, world_size=rank.world_size, drop_last=True
    )
    loader = DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=a.workers,
        collate_fn=_collate,
        # Own generator (checkpointed by the engine): workers' base seeds otherwise come from
        # the global RNG, which a resumed run would draw at another point of the stream.
        generator=torch.Generator().manual_seed(a.seed),
    )
    bad_log = out / "bad_images.jsonl"
    if not resume and rank.is_main and bad_log.exists():
        bad_log.unlink()
    trainer = PretrainTrainer(
        m,
        loader,
        max_epochs=a.epochs,
        bad_log=bad_log,
        whole_batches=local if a.method == "mocov2" else None,
    )
    files = RunFilesHook(m, out, a.export_layout == "upstream")
    monitors = MonitorHook(
        m, _eval_batches(items[: a.monitor_images], a.crop_size), _knn_sets(a), a.collapse_threshold
    )
    extra = {"method": m.name, "arch": m.arch}
    trainer.register_hooks(
        [
            hooks.MetricsWriter(
                out / "metrics.jsonl",
                period=1,
                progress=sys.stderr.isatty() or a.progress,
                description=a.method,
            ),
            monitors,
            hooks.PeriodicCheckpointer(
                out,
                period=a.ckpt_every,
                extra_state=lambda: extra,
                final_name=None,
                after_save=files.export,
            ),
            files,
        ]
    )
    if resume:
        state = trainer.resume(ckpt_path)
        if (state.get("method"), state.get("arch")) != (m.name, m.arch):
            raise PretrainError(
                f"{ckpt_path} is a {state.get('method')} {state.get('arch')} run, "
                f"not {m.name} {m.arch}"
            )
    trainer.train()
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
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
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
        return train_run(args)
    except (PretrainError, SourceError) as e:
        print(f"gridfeats pretrain: error: {e}", file=sys.stderr)
        return 2


__all__ = [
    "MonitorHook",
    "PretrainTrainer",
    "RunFilesHook",
    "add_arguments",
    "backbone_tensors",
    "export_backbone",
    "run",
    "train_run",
]
