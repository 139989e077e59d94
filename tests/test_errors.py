"""One root exception: every exception class the project defines derives from GridfeatsError and
keeps the builtin base its callers catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import gridfeats
import service
import vqa
from gridfeats.errors import GridfeatsError


def _project_exceptions():
    found = {}
    for package in (gridfeats, service, vqa):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                is_error = issubclass(obj, BaseException) and not issubclass(obj, Warning)
                if is_error and obj.__module__ == info.name:  # warning categories are not errors
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_project_exception_derives_from_the_root():
    found = _project_exceptions()
    assert len(found) >= 25  # the walk really saw the packages
    orphans = sorted(name for name, cls in found.items() if not issubclass(cls, GridfeatsError))
    assert orphans == []


def test_one_config_error_and_one_checkpoint_error():
    found = _project_exceptions()
    for short in ("ConfigError", "CheckpointError"):
        assert [n for n in found if n.rsplit(".", 1)[1] == short] != []
        assert len({cls for n, cls in found.items() if n.rsplit(".", 1)[1] == short}) == 1
    from gridfeats.checkpoint import CheckpointError
    from gridfeats.config import ConfigError
    from vqa.engine.checkpoint import CheckpointError as HeadsCheckpointError
    from vqa.engine.config import ConfigError as HeadsConfigError

    assert HeadsConfigError is ConfigError and HeadsCheckpointError is CheckpointError


@pytest.mark.parametrize(
    "module,name,builtin",
    [
        ("gridfeats.data.image_io", "ImageReadError", ValueError),
        ("gridfeats.store.errors", "StoreBusyError", ValueError),
        ("gridfeats.config", "ConfigError", ValueError),
        ("gridfeats.checkpoint", "CheckpointError", RuntimeError),
        ("gridfeats.checkpoint", "CheckpointError", ValueError),
        ("service.batcher", "QueueFullError", RuntimeError),
        ("service.settings", "SettingsError", ValueError),
    ],
)
def test_builtin_catchers_still_catch(module, name, builtin):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, builtin) and issubclass(cls, GridfeatsError)
