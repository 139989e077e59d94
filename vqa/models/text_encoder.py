"""Optional pretrained transformer question encoder, built from a local directory only.

Why local only: nothing may be downloaded at run time, so a hub name is never resolved; the
directory is what ``model.save_pretrained(dir)`` writes (use the matching tokenizer through
``vqa.data.hf_tokenizer``). ``transformers`` is imported only when this encoder is asked for.
The encoder replaces the word embedding + LSTM of Pythia/MCAN; its last hidden states are the
word features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn


class PretrainedTextEncoder(nn.Module):
    """``(ids [B, T], mask [B, T]) -> [B, T, out_dim]`` from a local transformers model."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], freeze: bool = False) -> None:
        super().__init__()
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise ValueError(
                f"text encoder directory {directory} has no config.json; give a "
                f"local directory written by save_pretrained (hub names are not "
                f"downloaded)"
            )
        try:
            from transformers import AutoModel
        except ImportError:
            raise ValueError(
                "a transformers text encoder needs the transformers package: "
                "pip install 'gridfeats[vqa]'"
            ) from None
        try:
            self.encoder = AutoModel.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a text encoder from {directory}: {exc}") from None
        self.out_dim = int(self.encoder.config.hidden_size)
        if freeze:
            self.encoder.requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
