"""Optional Hugging Face tokenizer for questions, loaded from a local directory only.

Why local only: nothing may be downloaded at run time, and a hub name silently falling back to
the network would break that rule on a machine that happens to be online. The directory is what
``tokenizer.save_pretrained(dir)`` writes; ``transformers`` is imported only here (it is in the
``vqa`` extra).

The object offers what ``VQADataset`` asks of a question encoder: ``encode(text, max_length)``,
``pad_id`` and ``len()``. Note that models which treat id 0 as padding need a tokenizer whose pad
id is 0 (BERT's is; RoBERTa's is 1): the collate function's ``question_mask`` is exact either way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

from vqa.data.json_files import DataFormatError


class HFQuestionTokenizer:
    """Wraps ``AutoTokenizer.from_pretrained(path, local_files_only=True)``."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        directory = Path(path)
        if not directory.is_dir():
            raise DataFormatError(
                f"tokenizer directory not found: {directory} (a local directory "
                f"written by save_pretrained is needed; hub names are not "
                f"downloaded)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataFormatError(
                "a Hugging Face tokenizer needs the transformers package: "
                "pip install 'gridfeats[vqa]'"
            ) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataFormatError(f"cannot load a tokenizer from {directory}: {exc}") from None
        if self.tokenizer.pad_token_id is None:
            raise DataFormatError(f"the tokenizer in {directory} has no padding token")

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, max_length: Optional[int] = None) -> List[int]:
        """Token ids with the tokenizer's special tokens, truncated to ``max_length`` ids."""
        return list(
            self.tokenizer(text, truncation=max_length is not None, max_length=max_length)[
                "input_ids"
            ]
        )
