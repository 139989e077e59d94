"""gridfeats: Detectron2-compatible grid/region features for vision-and-language work."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "gridfeats" / "version.py").read_text(), version)

setup(
    name="gridfeats",
    version=version["__version__"],
    description="Grid and region features from Detectron2-compatible VG detectors, "
    "batch extraction to HDF5, a feature service, and VQA/captioning heads",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["gridfeats*", "vqa*", "service*"]),
    # The shipped configs, for installs that are not editable (found by gridfeats.config).
    data_files=[
        (
            "share/gridfeats/configs",
            sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")),
        )
    ],
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "numpy>=1.22",
        "pillow>=9.1",
        "fvcore>=0.1.5",
        "pyyaml>=5.1",
        "h5py>=3.6",
        "tqdm>=4.60",
        "pycocotools>=2.0.6",
    ],
    extras_require={
        "service": [
            "fastapi>=0.115",  # query-parameter models (service.schemas.FeatureQuery)
            "uvicorn>=0.23",
            "pydantic>=2.0",
            "python-multipart>=0.0.6",
            "prometheus-client>=0.16",
            "pydantic-settings>=2.7",  # service.settings: GRIDFEATS_* variables (NoDecode: 2.7)
        ],
        "vqa": [
            "pycocoevalcap>=1.2",
            "transformers>=4.30",
            "lmdb>=1.0",  # `gridfeats export --format mmf-lmdb` (MMF's LMDB feature reader)
        ],
        "dev": [
            "pytest>=7.0",
            "ruff>=0.6",  # `make lint`, run by .ci/run before the tests
            "httpx>=0.24",
            "schemathesis>=4.0",  # tests/service/test_service_fuzz.py uses the 4.x Python API
        ],
    },
    entry_points={"console_scripts": ["gridfeats=gridfeats.cli:main"]},
)
