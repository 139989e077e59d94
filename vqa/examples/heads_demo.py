"""Train every head on synthetic data for a few minutes and compare with trivial baselines.

    python -m vqa.examples.heads_demo --out heads_demo [--images 1000] [--features-from real.h5]

What it shows (the issue's "done when"): Pythia and MCAN, on grid and on region features, answer
held-out questions far better than always giving the most frequent training answer; the Up-Down
captioner's held-out CIDEr-D is far above the best constant caption's. VQA numbers are the
official accuracy (``vqa.metrics.evaluate_vqa``); caption numbers are the COCO toolkit's
(``vqa.metrics.evaluate_captions``: PTB tokenizer, BLEU-4, METEOR, ROUGE-L, CIDEr-D) when Java
and pycocoevalcap are present, else the in-training CIDEr-D.

Features: by default structured stores from the synthetic annotations
(``vqa.examples.synthetic_features``); ``--grid-features``/``--region-features`` use stores
extracted with ``gridfeats extract`` from the same synthetic images instead (ids = image ids).
Models are scaled down (widths 64-256) so that everything runs on a laptop CPU.

``--extract`` runs make-synthetic -> ``gridfeats extract`` -> training in one command, on the
detector's own features: the demo detector (``configs/demo-synthetic.yaml``, trained on other
synthetic images by ``gridfeats.demo.demo_detector`` and cached, as ``gridfeats demo`` does) at
its own input size; ``--random-init`` keeps the seeded random initialisation instead (the figures
before a trained detector existed: 600 images, inputs 224/320, Pythia grid 49.8, region 51.4).
Besides the majority answer it prints the question-only baseline: each held-out question answered
with the most frequent training answer of the same question string, i.e. what a blind model can
learn. Figures are in the README.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from gridfeats.engine import seed_all_rngs
from vqa.engine.caption_task import CaptionTask
from vqa.engine.commands import task_defaults
from vqa.engine.config import load_config
from vqa.engine.trainer import fit_task
from vqa.engine.vqa_task import VQATask, majority_answer
from vqa.examples.synthetic_features import make_feature_dataset
from vqa.metrics import evaluate_vqa

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vqa"
SMALL_VQA = {
    "pythia": [
        "model.word_dim=64",
        "model.question_hidden=128",
        "model.question_attention=64",
        "model.image_dim=128",
        "model.fusion_dim=256",
        "model.classifier_hidden=256",
        "model.dropout=0.1",
        "optim.lr=0.003",
        "schedule.warmup=100",
        "schedule.milestones=[]",
        # Detector features share a large common component per channel; standardised, the
        # top-down attention leaves its uniform start within the run (README, grid VQA).
        "data.feature_norm=standardize",
    ],
    "mcan-small": [
        "model.size=null",
        "model.hidden=64",
        "model.heads=4",
        "model.ffn=128",
        "model.flat_mlp=64",
        "model.flat_out=128",
        "model.layers=2",
        "model.word_dim=32",
        "optim.lr=1e-3",
        "schedule.warmup=1",
        "schedule.milestones=[]",
        "data.feature_norm=standardize",
    ],
}
EPOCHS = {"pythia": 30, "mcan-small": 10}


def _say(text: str) -> None:
    print(text, flush=True)  # flushed: the demo runs for minutes, often into a log file


def _train(task_cls: Any, cfg: Dict[str, Any], out: Path) -> Any:
    seed_all_rngs(int(cfg["train"]["seed"]))
    task = task_cls(cfg)
    fit_task(task, cfg, out, torch.device("cpu"))
    return task


def run_vqa(
    paths: Dict[str, Path], model: str, mode: str, out: Path, epoch_scale: float
) -> Dict[str, Any]:
    opts = [
        f"data.features={paths[f'{mode}_features']}",
        f"data.train_questions={paths['train_questions']}",
        f"data.train_annotations={paths['train_annotations']}",
        f"data.val_questions={paths['val_questions']}",
        f"data.val_annotations={paths['val_annotations']}",
        "data.min_answer_count=1",
        "train.batch_size=32",
        "train.device=cpu",
        "train.progress=false",
        f"train.epochs={max(1, round(EPOCHS[model] * epoch_scale))}",
        *SMALL_VQA[model],
    ]
    cfg = load_config(CONFIGS / f"{model}.yaml", task_defaults("vqa"), opts)
    start = time.time()
    task = _train(VQATask, cfg, out / f"{model}-{mode}")
    results = task.predict(task.model, task.val_dataset)
    metrics = evaluate_vqa(paths["val_annotations"], paths["val_questions"], results)
    return {
        "model": model,
        "features": mode,
        "accuracy": metrics["overall"],
        "perAnswerType": metrics["perAnswerType"],
        "minutes": (time.time() - start) / 60,
    }


def vqa_majority_baseline(paths: Dict[str, Path]) -> Dict[str, Any]:
    answer = majority_answer(paths["train_annotations"])
    questions = json.loads(Path(paths["val_questions"]).read_text())["questions"]
    results = [{"question_id": q["question_id"], "answer": answer} for q in questions]
    metrics = evaluate_vqa(paths["val_annotations"], paths["val_questions"], results)
    return {
        "answer": answer,
        "accuracy": metrics["overall"],
        "perAnswerType": metrics["perAnswerType"],
    }


def vqa_question_only_baseline(paths: Dict[str, Path]) -> Dict[str, Any]:
    """Each held-out question answered with the most frequent training answer of the same question
    string (the overall majority for an unseen string): the best a model that ignores the image
    can do on these questions."""

    def load(split: str):
        questions = json.loads(Path(paths[f"{split}_questions"]).read_text())["questions"]
        annotations = json.loads(Path(paths[f"{split}_annotations"]).read_text())["annotations"]
        return questions, {a["question_id"]: a["multiple_choice_answer"] for a in annotations}

    train_questions, train_answers = load("train")
    by_text: Dict[str, Counter] = defaultdict(Counter)
    for q in train_questions:
        by_text[q["question"]][train_answers[q["question_id"]]] += 1
    overall = Counter(train_answers.values()).most_common(1)[0][0]
    results = [
        {
            "question_id": q["question_id"],
            "answer": (
                by_text[q["question"]].most_common(1)[0][0] if q["question"] in by_text else overall
            ),
        }
        for q in load("val")[0]
    ]
    metrics = evaluate_vqa(paths["val_annotations"], paths["val_questions"], results)
    return {"accuracy": metrics["overall"], "perAnswerType": metrics["perAnswerType"]}


def _caption_scores(
    task: CaptionTask, results: List[Dict[str, Any]], annotations: Path
) -> Dict[str, float]:
    try:
        from vqa.metrics import evaluate_captions

        return evaluate_captions(annotations, results, use_spice=False)
    except ValueError as exc:  # no Java or no pycocoevalcap: fall back to the in-training metric
        _say(f"official caption metrics unavailable ({exc}); using in-training CIDEr-D")
        return {"CIDEr": task.validation_cider(results)}


def run_captioner(
    paths: Dict[str, Path], mode: str, out: Path, epoch_scale: float
) -> Dict[str, Any]:
    opts = [
        f"data.features={paths[f'{mode}_features']}",
        f"data.train_captions={paths['train_captions']}",
        f"data.val_captions={paths['val_captions']}",
        "data.min_word_count=1",
        "model.hidden=128",
        "model.attention_dim=64",
        "model.word_dim=64",
        "model.dropout=0.1",
        "optim.lr=3e-3",
        "optim.grad_clip=1.0",
        "schedule.milestones=[]",
        "scst.start_epoch=null",
        "train.batch_size=32",
        "train.device=cpu",
        "train.progress=false",
        f"train.epochs={max(1, round(12 * epoch_scale))}",
    ]
    cfg = load_config(CONFIGS / "updown.yaml", task_defaults("caption"), opts)
    start = time.time()
    task = _train(CaptionTask, cfg, out / f"updown-{mode}")
    results = task.predict(task.model, task.val_images)
    train_refs = Counter(
        a["caption"] for a in json.loads(Path(paths["train_captions"]).read_text())["annotations"]
    )
    constant = train_refs.most_common(1)[0][0]
    constant_results = [{"image_id": r["image_id"], "caption": constant} for r in results]
    return {
        "features": mode,
        "model": _caption_scores(task, results, paths["val_captions"]),
        "constant_caption": constant,
        "constant": _caption_scores(task, constant_results, paths["val_captions"]),
        "examples": results[:3],
        "minutes": (time.time() - start) / 60,
    }


def extract_stores(
    paths: Dict[str, Path],
    out_dir: Path,
    min_size: Optional[int] = 224,
    max_size: Optional[int] = 320,
    num_boxes: int = 10,
    seed: int = 0,
    threads: int = 1,
    modes: Sequence[str] = ("grid", "region"),
    config: str = "R-50-grid",
    weights: Optional[Path] = None,
) -> Dict[str, Path]:
    """Grid and bottom-up region stores of the synthetic images, by ``gridfeats extract``'s code.

    Why: the heads must also learn from what the detector actually gives, not only from the
    structured stores. ``config``/``weights``: the detector (``weights=None`` keeps its seeded
    random initialisation); ``min_size``/``max_size`` override the config's test input size
    (``None``: the config's own).
    Returns ``{"<mode>_features": store path}`` per mode (store ids = image ids).
    """
    from gridfeats.extract.job import ExtractOptions, run_extraction
    from gridfeats.features import BottomUpSettings

    opts: List[str] = []
    if min_size is not None:
        opts += ["INPUT.MIN_SIZE_TEST", str(min_size)]
    if max_size is not None:
        opts += ["INPUT.MAX_SIZE_TEST", str(max_size)]
    stores: Dict[str, Path] = {}
    for mode in modes:
        output = Path(out_dir) / f"extracted_{mode}.h5"
        options = ExtractOptions(
            input=str(paths["instances"]),
            image_root=str(paths["images"]),
            output=str(output),
            mode=mode,
            regions="bottom-up",
            bottom_up=BottomUpSettings(min_boxes=num_boxes, max_boxes=num_boxes),
            config=config,
            opts=opts,
            weights=None if weights is None else str(weights),
            workers=0,
            dtype="float32",
            seed=seed,
            threads=threads,
            progress=False,
            overwrite=True,
        )
        start = time.time()
        summary = run_extraction(options, log=io.StringIO())
        if summary.errors:
            raise RuntimeError(
                f"{summary.errors} synthetic images failed to extract: {summary.error_sample}"
            )
        which = "random-init detector" if weights is None else f"{config} detector, {weights}"
        _say(
            f"extracted {mode} features of {summary.images} images "
            f"({time.time() - start:.0f} s, {which})"
        )
        stores[f"{mode}_features"] = output
    return stores


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("heads_demo"))
    parser.add_argument("--images", type=int, default=1000, help="synthetic images (80%% train)")
    parser.add_argument(
        "--epoch-scale",
        type=float,
        default=1.0,
        help="multiply every run's epochs (e.g. 0.5 for a quicker look)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (more only helps on an otherwise idle machine)",
    )
    parser.add_argument("--grid-features", type=Path, help="extracted grid store to use instead")
    parser.add_argument(
        "--region-features", type=Path, help="extracted region store to use instead"
    )
    parser.add_argument(
        "--extract",
        action="store_true",
        help="extract grid and region stores from the synthetic images with the "
        "(random-init) detector here, and train on those",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="--extract: the seeded random-init R-50-grid detector instead of the demo detector",
    )
    parser.add_argument(
        "--extract-size",
        type=int,
        nargs=2,
        metavar=("SHORT", "MAX"),
        help="--extract: detector input size (default: the demo detector's config; 224 320 with "
        "--random-init)",
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        default=["pythia", "mcan-small", "updown"],
        choices=["pythia", "mcan-small", "updown"],
        help="which heads to train",
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="--extract: the demo detector's cache (see gridfeats demo)"
    )
    parser.add_argument(
        "--detector-weights",
        type=Path,
        help="--extract: weights of a demo-synthetic detector to use instead of the cached one",
    )
    parser.add_argument(
        "--num-boxes", type=int, default=10, help="--extract: bottom-up regions per image"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = make_feature_dataset(
        args.out / "data",
        args.images,
        seed=0,
        overwrite=True,
        modes=() if args.extract else ("grid", "region"),
    )
    if args.extract:
        if args.random_init:
            config, weights, size = "R-50-grid", None, args.extract_size or (224, 320)
        elif args.detector_weights:
            from gridfeats.demo import DEMO_CONFIG

            config, weights = DEMO_CONFIG, args.detector_weights
            size = args.extract_size or (None, None)
        else:
            from gridfeats.demo import DEMO_CONFIG, demo_detector

            trained = demo_detector(cache_dir=args.cache_dir)
            _say(
                f"demo detector {'from the cache' if trained.cached else 'trained'}: "
                f"{trained.weights}; {trained.summary()}"
            )
            config, weights, size = DEMO_CONFIG, trained.weights, args.extract_size or (None, None)
        paths.update(
            extract_stores(
                paths,
                args.out / "data",
                *size,
                num_boxes=args.num_boxes,
                threads=args.threads,
                config=config,
                weights=weights,
            )
        )
    if args.grid_features:
        paths["grid_features"] = args.grid_features
    if args.region_features:
        paths["region_features"] = args.region_features
    report: Dict[str, Any] = {"images": args.images, "vqa_majority": vqa_majority_baseline(paths)}
    _say(
        f"majority answer {report['vqa_majority']['answer']!r}: "
        f"{report['vqa_majority']['accuracy']:.2f} held-out VQA accuracy"
    )
    report["vqa_question_only"] = vqa_question_only_baseline(paths)
    _say(
        f"question-only baseline (best training answer per question string): "
        f"{report['vqa_question_only']['accuracy']:.2f} held-out VQA accuracy"
    )
    report["vqa"] = []
    for model in (m for m in ("pythia", "mcan-small") if m in args.heads):
        for mode in ("grid", "region"):
            row = run_vqa(paths, model, mode, args.out / "runs", args.epoch_scale)
            report["vqa"].append(row)
            _say(
                f"{model:>10} {mode:>6}: {row['accuracy']:6.2f} held-out VQA accuracy "
                f"({row['minutes']:.1f} min) {row['perAnswerType']}"
            )
    if "updown" in args.heads:
        report["captions"] = run_captioner(paths, "region", args.out / "runs", args.epoch_scale)
        cap = report["captions"]
        _say(
            f"captioner: CIDEr-D {cap['model']['CIDEr']:.3f} vs constant caption "
            f"{cap['constant_caption']!r} {cap['constant']['CIDEr']:.3f} ({cap['minutes']:.1f} min)"
        )
    (args.out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    _say(f"wrote {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
