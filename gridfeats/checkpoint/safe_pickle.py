"""Reading pickles without running arbitrary code.

Checkpoints are pickles, and a pickle can execute anything on load. ``.pth`` files go through
``torch.load(weights_only=True)``; Caffe2/Detectron ``.pkl`` files through
:class:`RestrictedUnpickler`, which only materialises plain containers and numpy arrays and refuses
every other global by name.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO

from gridfeats.errors import GridfeatsError

_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class UnsafePickleError(GridfeatsError, pickle.UnpicklingError):
    """The pickle asked for a global that is not on the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name} from a pickle: only tensors, numpy arrays and plain "
            "containers are allowed in checkpoints"
        )


def restricted_load(fp: BinaryIO, encoding: str = "latin1") -> Any:
    """``pickle.load`` limited to the allow-list (``latin1`` reads Python-2 Caffe2 pickles)."""
    return RestrictedUnpickler(fp, encoding=encoding).load()
