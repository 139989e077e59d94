"""The Up-Down captioner as a training task: cross-entropy, then optional self-critical training.

Config (``configs/vqa/updown.yaml``)::

    model: {name: updown, hidden: 1000, attention_dim: 512, word_dim: 1000, dropout: 0.5}
    data:
      features: feats.h5
      train_captions / val_captions: COCO caption json files
      min_word_count: 5, max_caption_length: 16, max_rows: 100, missing_images: error
      row_cache_mb: 1024            # decoded feature rows kept in memory, per process
      feature_norm: none            # or standardize (per-channel, training statistics)
    decode: {beam_size: 3, max_length: 16}
    scst: {start_epoch: null, samples_per_image: 5, baseline: greedy}

Epochs before ``scst.start_epoch`` (0-based; null = never) minimise cross-entropy on every
reference caption. From that epoch on, SCST (Rennie et al. 2017): for each image of the batch,
``samples_per_image`` captions are sampled and rewarded with CIDEr-D (against the training
references, document frequencies of the whole training set) minus a baseline: the greedy
caption's CIDEr-D (``baseline: greedy``, the paper) or the mean reward of the image's other
samples (``baseline: mean``, Luo 2020; steadier on small data). The training batches stay
those of the reference-caption view, so an image with five references is visited five times per
epoch in both phases.

Validation during training decodes with beam search and scores CIDEr-D on the tokeniser's words
(``vqa.engine.cider_reward``, no Java); official numbers come from ``gridfeats caption eval``
(PTB tokenizer, BLEU/METEOR/ROUGE-L/CIDEr-D through pycocoevalcap) on ``predict``'s output.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gridfeats.engine import move_to_device, unwrap
from vqa.data import CaptionDataset, DataFormatError, WordVocab, tokenize
from vqa.data.image_rows import open_row_reader, task_row_normalization
from vqa.data.json_files import read_json
from vqa.engine.cider_reward import CiderD
from vqa.models import build_captioner

CAPTION_DEFAULTS: Dict[str, Any] = {
    "model": {"name": "updown"},
    "data": {
        "features": None,
        "train_captions": None,
        "val_captions": None,
        "min_word_count": 5,
        "max_caption_length": 16,
        "max_rows": 100,
        "row_cache_mb": 1024,
        "feature_norm": "none",
        "missing_images": "error",
    },
    "decode": {"beam_size": 3, "max_length": 16},
    "scst": {"start_epoch": None, "samples_per_image": 5, "baseline": "greedy"},
}
SCST_BASELINES = ("greedy", "mean")


def caption_cross_entropy(logits: torch.Tensor, captions_out: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; padding (id 0) is ignored."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), captions_out.reshape(-1), ignore_index=0
    )


def _strip(tokens: List[int], eos_id: int) -> List[int]:
    """Token ids up to (not including) EOS, without padding."""
    out = []
    for token in tokens:
        if token == eos_id:
            break
        if token != 0:
            out.append(token)
    return out


class CaptionTask:
    """Builds the caption vocabulary, datasets and the Up-Down model from a config/checkpoint."""

    kind = "caption"

    def __init__(
        self,
        cfg: Mapping[str, Any],
        state: Optional[Mapping[str, Any]] = None,
        features: Optional[str] = None,
        for_training: bool = True,
    ) -> None:
        self.cfg = cfg
        data = cfg["data"]
        self.features_path, self.reader = open_row_reader(data, features)
        if state is not None:
            self.vocab = WordVocab(**state["vocab"])
            if self.reader.feature_dim != int(state["feature_dim"]):
                raise DataFormatError(
                    f"the feature store {self.features_path} has {self.reader.feature_dim}-d "
                    f"features but the model was trained on {state['feature_dim']}-d features"
                )
        else:
            if not data["train_captions"]:
                raise DataFormatError("the config lacks data.train_captions")
            self.vocab = WordVocab.from_captions(
                data["train_captions"], min_count=int(data["min_word_count"])
            )
        self.feature_norm = task_row_normalization(
            data, self.reader, state, lambda: self._image_ids(data["train_captions"])
        )
        self.model: nn.Module = build_captioner(
            cfg["model"],
            len(self.vocab),
            self.reader.feature_dim,
            self.vocab.bos_id,
            self.vocab.eos_id,
        )
        self.train_dataset = self.val_images = None
        self._reward: Optional[CiderD] = None
        self._val_cider: Optional[CiderD] = None
        self._step_stats: Dict[str, float] = {}
        if for_training:
            self.train_dataset = self.captions_dataset(data["train_captions"], per_image=False)
            if data["val_captions"]:
                self.val_images = self.captions_dataset(data["val_captions"], per_image=True)

    @staticmethod
    def _image_ids(captions: Any) -> List[Any]:
        return [a["image_id"] for a in read_json(captions, "COCO captions")["annotations"]]

    def captions_dataset(self, captions: Any, per_image: bool) -> CaptionDataset:
        data = self.cfg["data"]
        return CaptionDataset(
            captions,
            self.reader,
            self.vocab,
            max_length=int(data["max_caption_length"]),
            per_image=per_image,
            missing_images=data["missing_images"],
        )

    # ----------------------------------------------------------------- TrainingTask protocol
    def collate(self, items: List[Any]) -> Dict[str, Any]:
        return self.train_dataset.collate(items)

    def training_loss(self, model: nn.Module, batch: Dict[str, Any], epoch: int) -> torch.Tensor:
        start = self.cfg["scst"]["start_epoch"]
        if start is not None and epoch >= int(start):
            return self.self_critical_loss(model, batch)
        self._step_stats = {}
        logits = model(batch["feats"], batch["feat_mask"], batch["boxes"], batch["captions_in"])
        return caption_cross_entropy(logits, batch["captions_out"])

    def _reward_scorer(self) -> CiderD:
        if self._reward is None:
            dataset = self.train_dataset
            self._reward = CiderD(
                {
                    index: [
                        self.vocab.encode(c, int(self.cfg["data"]["max_caption_length"]))
                        for c in dataset.references(index)
                    ]
                    for index in range(len(dataset.image_ids))
                }
            )
        return self._reward

    def self_critical_loss(self, model: nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
        """SCST: -(CIDEr-D(sample) - baseline) * log p(sample), averaged over tokens.

        ``scst.baseline``: ``greedy`` (Rennie et al.: the greedy caption's CIDEr-D) or ``mean``
        (the mean reward of the image's *other* samples, Luo 2020), which needs no extra decode
        and has lower variance.
        """
        scorer = self._reward_scorer()
        max_len = int(self.cfg["decode"]["max_length"])
        samples_per_image = int(self.cfg["scst"]["samples_per_image"])
        baseline_kind = self.cfg["scst"]["baseline"]
        if baseline_kind not in SCST_BASELINES:
            raise ValueError(
                f"scst.baseline must be one of {SCST_BASELINES}, got {baseline_kind!r}"
            )
        if baseline_kind == "mean" and samples_per_image < 2:
            raise ValueError("scst.baseline 'mean' needs scst.samples_per_image >= 2")
        images = batch["image_index"].tolist()
        inputs = (batch["feats"], batch["feat_mask"], batch["boxes"])
        bare = unwrap(model)
        eos = bare.eos_id
        greedy_scores = None
        if baseline_kind == "greedy":
            bare.eval()
            with torch.no_grad():
                greedy, _ = bare.sample(*inputs, max_len=max_len, greedy=True)
            bare.train()
            greedy_scores = torch.tensor(
                [scorer.score(i, _strip(t, eos)) for i, t in zip(images, greedy.tolist())]
            )
        tokens, logprobs = model(
            *inputs,
            mode="sample",
            max_len=max_len,
            greedy=False,
            samples_per_image=samples_per_image,
        )
        scores = torch.tensor(
            [
                scorer.score(images[row // samples_per_image], _strip(sampled, eos))
                for row, sampled in enumerate(tokens.tolist())
            ]
        )
        per_image = scores.view(len(images), samples_per_image)
        if greedy_scores is not None:
            baseline = greedy_scores.unsqueeze(1).expand_as(per_image)
        else:
            baseline = (per_image.sum(1, keepdim=True) - per_image) / (samples_per_image - 1)
        advantage = (per_image - baseline).reshape(-1).to(logprobs)
        self._step_stats = {
            "reward": float(scores.mean()),
            "baseline_reward": float(baseline.mean()),
        }
        mask = (tokens != 0).to(logprobs.dtype)
        return -(advantage.unsqueeze(1) * logprobs * mask).sum() / mask.sum().clamp(min=1.0)

    def evaluate(self, model: nn.Module) -> Dict[str, Any]:
        """Beam-search captions of the validation images, CIDEr-D on tokeniser words."""
        if self.val_images is None:
            return {}
        cider = self.validation_cider(self.predict(model, self.val_images))
        return {"score": cider, "CIDEr-D": cider}

    def validation_cider(self, results: List[Dict[str, Any]]) -> float:
        """Mean CIDEr-D of ``[{"image_id", "caption"}]`` against the validation references.

        Document frequencies come from the validation references, as the COCO toolkit does;
        words are ``vqa.data.tokenize``'s, not the PTB tokenizer's (close, not identical).
        """
        dataset = self.val_images
        if dataset is None:
            raise ValueError("no validation captions (data.val_captions) to score against")
        if self._val_cider is None:
            self._val_cider = CiderD(
                {
                    image_id: [tokenize(c) for c in dataset.references(i)]
                    for i, image_id in enumerate(dataset.image_ids)
                }
            )
        scores = [self._val_cider.score(r["image_id"], tokenize(r["caption"])) for r in results]
        return sum(scores) / len(scores)

    def step_stats(self) -> Dict[str, float]:
        """During SCST: mean CIDEr-D of the sampled and of the greedy (baseline) captions."""
        return dict(self._step_stats)

    def checkpoint_state(self) -> Dict[str, Any]:
        return {
            "vocab": {
                "specials": list(self.vocab.specials),
                "words": self.vocab.itos[len(self.vocab.specials) :],
            },
            "feature_dim": self.reader.feature_dim,
            "feature_norm": self.feature_norm.state() if self.feature_norm else None,
        }

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        dataset: CaptionDataset,
        beam_size: Optional[int] = None,
        batch_size: Optional[int] = None,
    ) -> List[Dict[str, Any]]:
        """``[{"image_id", "caption"}]`` for every image of a per-image ``dataset``."""
        bare = unwrap(model)
        was_training = bare.training
        bare.eval()
        device = next(bare.parameters()).device
        decode = self.cfg["decode"]
        loader = DataLoader(
            dataset,
            batch_size=batch_size or int(self.cfg["train"]["eval_batch_size"]),
            shuffle=False,
            collate_fn=dataset.collate,
            generator=torch.Generator(),
        )
        results = []
        for batch in loader:
            batch = move_to_device(batch, device)
            tokens = bare.beam_search(
                batch["feats"],
                batch["feat_mask"],
                batch["boxes"],
                beam_size=int(beam_size or decode["beam_size"]),
                max_len=int(decode["max_length"]),
            )
            for index, row in zip(batch["image_index"].tolist(), tokens.tolist()):
                results.append(
                    {"image_id": dataset.image_ids[index], "caption": self.vocab.decode(row)}
                )
        bare.train(was_training)
        return results
