"""gridfeats: grid and region features, their store, service and VQA heads.

Each subcommand lives in the module that owns its feature; this file only maps names to modules,
so importing the CLI stays cheap (torch is imported by a subcommand only when it runs). A command
module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence, Tuple

# (name, module, one-line help). Nested groups ("vqa", "caption") are dispatched by their module.
COMMANDS: List[Tuple[str, str, str]] = [
    (
        "extract",
        "gridfeats.extract.cli",
        "extract grid or region features into an HDF5 feature store",
    ),
    ("merge", "gridfeats.store.cli_merge", "merge shard files into one feature store"),
    ("export", "gridfeats.store.cli_export", "export a feature store to other projects' layouts"),
    (
        "convert-backbone",
        "gridfeats.checkpoint.convert.cli",
        "convert an SSL / torchvision / Hugging Face backbone into weights + config",
    ),
    ("make-synthetic", "gridfeats.data.synthetic", "render a synthetic VG/VQA/captioning data set"),
    (
        "train-detector",
        "gridfeats.engine.detection_cli",
        "train or evaluate a detector (COCO json with attributes)",
    ),
    ("serve", "service.cli", "run the REST feature endpoint"),
    ("vqa", "vqa.cli_vqa", "train, predict and evaluate VQA heads"),
    ("caption", "vqa.cli_caption", "train, predict and evaluate the captioning head"),
    ("demo", "gridfeats.demo", "the main job end to end on synthetic data"),
    (
        "pretrain",
        "gridfeats.pretrain.train",
        "self-supervised pretraining (SimSiam, MoCo, MAE, DINO)",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    from gridfeats.version import __version__

    parser = argparse.ArgumentParser(prog="gridfeats", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gridfeats {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, _module, help_text in COMMANDS:
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = {name: (module, help_text) for name, module, help_text in COMMANDS}
    if not argv or argv[0] not in table:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = table[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"gridfeats {name}", description=help_text)
    module.add_arguments(parser)
    # KEY=VALUE positionals may follow options (gridfeats pretrain): parse them intermixed.
    parse = parser.parse_intermixed_args if getattr(module, "INTERMIXED_ARGS", False) else None
    args = (parse or parser.parse_args)(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
