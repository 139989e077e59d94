"""Service tests build settings from keyword arguments; ``GRIDFEATS_*`` variables of the shell that
runs them (a developer's ``GRIDFEATS_API_KEYS``, say) must not leak in, since ServiceSettings reads
the environment itself."""

from __future__ import annotations

import pytest

from service.settings import ENV_PREFIX, ServiceSettings


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch):
    for name in ServiceSettings.model_fields:
        monkeypatch.delenv(ENV_PREFIX + name.upper(), raising=False)
