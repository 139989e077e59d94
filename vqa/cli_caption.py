"""``gridfeats caption train|predict|eval``: the Up-Down captioner on stored features.

    gridfeats caption train --config configs/vqa/updown.yaml --out runs/updown [--resume] \
        [OVERRIDE ...]
    gridfeats caption predict --checkpoint runs/updown [--images val_captions.json] \
        --out results.json
    gridfeats caption eval --annotations captions_val.json --results RES [--out METRICS.json]

OVERRIDE: config overrides as ``KEY VALUE`` pairs or ``key=value`` words.
``eval`` needs no model: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D through pycocoevalcap (PTB
tokenisation, Java), SPICE only when its models are installed (else skipped with a message).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vqa.engine import commands

PROG = "gridfeats caption"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    commands.add_train_arguments(actions.add_parser("train", help="train the captioner"))
    predict = actions.add_parser("predict", help="caption images; writes the COCO results json")
    commands.add_predict_arguments(predict)
    predict.add_argument(
        "--images",
        help="COCO json whose 'images' (or captioned images) to "
        "caption; default: every image of the feature store",
    )
    predict.add_argument("--beam-size", type=int, help="default: decode.beam_size of the config")
    evaluate = actions.add_parser("eval", help="COCO caption metrics of a results file")
    evaluate.add_argument("--annotations", required=True, help="COCO captions json (references)")
    evaluate.add_argument("--results", required=True, help='results json [{"image_id", "caption"}]')
    evaluate.add_argument("--out", type=Path, help="write the metrics json here")
    spice = evaluate.add_mutually_exclusive_group()
    spice.add_argument(
        "--spice",
        dest="use_spice",
        action="store_const",
        const=True,
        help="require SPICE (error if its models are not installed)",
    )
    spice.add_argument(
        "--no-spice", dest="use_spice", action="store_const", const=False, help="never run SPICE"
    )


@commands.reports_user_errors(PROG)
def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return commands.train(args, "caption")
    if args.action == "predict":
        task = commands.load_for_inference(args, "caption")
        images = args.images or {"images": [{"id": i} for i in task.reader.store.ids]}
        dataset = task.captions_dataset(images, per_image=True)
        results = task.predict(
            task.model, dataset, beam_size=args.beam_size, batch_size=args.batch_size
        )
        commands.write_json(args.out, results)
        print(f"wrote {len(results)} captions to {args.out}")
        return 0
    from vqa.metrics import evaluate_captions

    metrics = evaluate_captions(args.annotations, args.results, use_spice=args.use_spice)
    commands.print_caption_metrics(metrics)
    if args.out:
        commands.write_json(args.out, metrics)
    return 0
