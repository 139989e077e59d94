"""``gridfeats convert-backbone``: any supported backbone checkpoint -> project weights + config.

    from gridfeats.checkpoint.convert import convert_backbone
    result = convert_backbone("checkpoint_0199.pth.tar", "simsiam.pth")   # writes simsiam.yaml too
    print(result.summary())

Split like Detectron2's converters: :mod:`.layouts` finds the layout and the backbone branch,
:mod:`.resnet` / :mod:`.vit` / :mod:`.hf` turn the branch into the project's names and read the
architecture, :mod:`.writer` writes the checkpoint and the config and proves that the config's
model loads every backbone tensor of the checkpoint.
"""

from gridfeats.checkpoint.convert.errors import ConversionError
from gridfeats.checkpoint.convert.layouts import FORMATS, Recognised, recognise
from gridfeats.checkpoint.convert.writer import Conversion, convert_backbone

__all__ = [
    "FORMATS",
    "Conversion",
    "ConversionError",
    "Recognised",
    "convert_backbone",
    "recognise",
]
