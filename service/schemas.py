"""The API of the feature service as pydantic models: the single source of validation and docs.

Query parameters, JSON answers and error bodies are declared here once; FastAPI validates requests
against them and renders the OpenAPI schema (with the examples below) from them. The request body
(raw image bytes or multipart) is read by :mod:`service.uploads` for the byte limit's sake, so its
OpenAPI description is built here too, from the same media-type list the reader enforces.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.uploads import GENERIC_BINARY, IMAGE_MEDIA_TYPES, IMAGES_FIELD, MULTIPART

Mode = Literal["grid", "region"]
RegionRule = Literal["detectron2", "bottom-up"]
OutputDtype = Literal["float32", "float16"]

#: Largest grid_pool side accepted.
MAX_POOL_SIDE = 64

#: Response media types besides JSON.
NPY_MEDIA_TYPE = "application/x-npy"
NPZ_MEDIA_TYPE = "application/x-npz"
JSON_MEDIA_TYPE = "application/json"


_BOTTOM_UP_ONLY = frozenset({"min_boxes", "max_boxes", "bottom_up_thresh"})
_REGION_ONLY = frozenset({"regions", "attr_topk"}) | _BOTTOM_UP_ONLY


class FeatureQuery(BaseModel):
    """Query parameters of ``POST /v1/features``; they mirror ``gridfeats extract``'s options."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        "grid",
        description="grid: the C5 feature map as rows (row y*w+x is map[:, y, x]); "
        "region: selected boxes with one pooled feature each",
    )
    grid_pool: Optional[str] = Field(
        None,
        pattern=r"^[0-9]{1,2}x[0-9]{1,2}$",
        description=f"grid mode: average-pool the map to HxW cells (1..{MAX_POOL_SIDE} each), "
        "as extract --grid-pool",
        examples=["7x7"],
    )
    regions: RegionRule = Field(
        "detectron2",
        description="region mode: detectron2 (the config's inference) or bottom-up "
        "(bottom-up-attention's generate_tsv.py rule), as extract --regions",
    )
    min_boxes: int = Field(10, ge=1, le=1000, description="bottom-up: at least this many boxes")
    max_boxes: int = Field(100, ge=1, le=1000, description="bottom-up: at most this many boxes")
    bottom_up_thresh: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="bottom-up: keep boxes whose best class score is at least this",
    )
    attr_topk: int = Field(
        10,
        ge=0,
        le=400,
        description="region mode: attributes per box by probability, capped at the model's count",
    )
    precision: OutputDtype = Field("float32", description="dtype of the returned features")

    @model_validator(mode="after")
    def _consistent(self) -> "FeatureQuery":
        given = self.model_fields_set
        misplaced = sorted(given & _REGION_ONLY) if self.mode != "region" else []
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} to "
                "mode=region only"
            )
        misplaced = sorted(given & _BOTTOM_UP_ONLY) if self.regions != "bottom-up" else []
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} appl{'ies' if len(misplaced) == 1 else 'y'} to "
                "regions=bottom-up only"
            )
        if self.grid_pool is not None:
            if self.mode != "grid":
                raise ValueError("grid_pool applies to grid mode only")
            if not all(1 <= side <= MAX_POOL_SIDE for side in self.pool_hw()):
                raise ValueError(
                    f"grid_pool sides must be 1..{MAX_POOL_SIDE}, got {self.grid_pool}"
                )
        if self.regions == "bottom-up" and self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes ({self.min_boxes}) exceeds max_boxes ({self.max_boxes})")
        return self

    def pool_hw(self) -> Optional[Tuple[int, int]]:
        """``grid_pool`` as ``(h, w)``, or None."""
        if self.grid_pool is None:
            return None
        h, w = self.grid_pool.split("x")
        return int(h), int(w)


class ModelRef(BaseModel):
    """Which model produced an answer, so clients can tell feature spaces apart."""

    config: str = Field(..., examples=["R-50-grid"])
    weights_sha256: str = Field(..., description="SHA-256 of the checkpoint; empty for random init")


class ImageFeaturesBase(BaseModel):
    index: int = Field(..., description="position of the image in the request")
    image_hw: List[int] = Field(
        ..., description="decoded image height, width (after EXIF rotation)"
    )
    input_hw: List[int] = Field(..., description="network input height, width after resizing")
    shape: List[int] = Field(..., description="shape of features")
    features: List[List[float]] = Field(..., description="feature rows, nested lists")


class GridImageFeatures(ImageFeaturesBase):
    """Grid features of one image: ``shape == [h*w, C]`` rows of the (pooled) C5 map."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "index": 0,
                    "image_hw": [480, 640],
                    "input_hw": [600, 800],
                    "grid_hw": [1, 2],
                    "shape": [2, 4],
                    "features": [[0.0, 1.25, 0.5, 0.0], [0.75, 0.0, 0.0, 2.0]],
                }
            ]
        }
    )

    grid_hw: List[int] = Field(..., description="h, w of the returned grid (after grid_pool)")


class RegionImageFeatures(ImageFeaturesBase):
    """Selected regions of one image: ``shape == [K, D]``, in the selection rule's order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "index": 0,
                    "image_hw": [480, 640],
                    "input_hw": [600, 800],
                    "shape": [1, 4],
                    "features": [[0.1, 0.0, 2.5, 0.3]],
                    "boxes": [[12.0, 40.5, 210.0, 300.25]],
                    "scores": [0.91],
                    "classes": [57],
                    "class_names": ["dog"],
                    "attr_ids": [[11, 3]],
                    "attr_scores": [[0.62, 0.11]],
                    "attr_names": [["brown", "white"]],
                }
            ]
        }
    )

    boxes: List[List[float]] = Field(..., description="x1, y1, x2, y2 in original-image pixels")
    scores: List[float]
    classes: List[int] = Field(..., description="object class ids, 0-based, background excluded")
    class_names: Optional[List[str]] = Field(
        None, description="present when a vocabulary is configured"
    )
    attr_ids: List[List[int]] = Field(
        ..., description="top attr_topk attribute ids per box, most probable first"
    )
    attr_scores: List[List[float]] = Field(..., description="their probabilities")
    attr_names: Optional[List[List[str]]] = Field(
        None, description="present with an attribute vocabulary"
    )


class FeaturesResponse(BaseModel):
    """The JSON answer of ``POST /v1/features``: one entry per image, in request order."""

    mode: Mode
    dtype: OutputDtype
    feature_dim: int = Field(
        ..., description="C (grid) or D (region): columns of every features row"
    )
    model: ModelRef
    images: List[Union[GridImageFeatures, RegionImageFeatures]]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: a stable machine code and a specific human reason."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"code": "bad_image", "detail": "image 0: truncated image"}]
        }
    )

    code: str = Field(..., examples=["bad_image"])
    detail: str = Field(..., examples=["image 0: truncated image"])


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    detail: str = Field(..., examples=["model loaded and warmed up"])


class ModelInfo(BaseModel):
    """What ``GET /v1/model`` reports about the loaded model and the service limits."""

    model_config = ConfigDict(protected_namespaces=())

    config: str = Field(..., description="config name (the YAML file's stem, or 'default')")
    weights_sha256: str = Field(..., description="SHA-256 of the checkpoint; empty for random init")
    random_init: bool
    device: str
    precision: str = Field(..., description="compute precision: fp32 (exact), bf16 or fp16")
    modes: List[Mode]
    feature_dims: Dict[str, int] = Field(..., description="columns of features per mode")
    num_classes: int
    num_attributes: int
    input_min_size: int = Field(..., description="INPUT.MIN_SIZE_TEST: shortest edge after resize")
    input_max_size: int = Field(..., description="INPUT.MAX_SIZE_TEST: cap on the longest edge")
    vocabulary: bool = Field(..., description="whether class/attribute names are returned")
    max_batch: int
    max_images_per_request: int
    max_upload_bytes: int
    max_pixels: int


def error_responses(*statuses: int) -> Dict[Union[int, str], Dict[str, Any]]:
    """OpenAPI ``responses`` entries (all :class:`ErrorResponse`) for these error statuses."""
    descriptions = {
        400: "undecodable, truncated or empty image, or a malformed body",
        401: "API keys are enabled and the X-API-Key header is missing or wrong",
        406: "the Accept header asks for a type this request cannot be answered in",
        408: "the body did not arrive within the per-request timeout",
        413: "upload larger than the byte limit, too many images, or too many pixels",
        415: "content type missing, not an image type, or contradicted by the bytes",
        422: "invalid query parameters",
        500: "the model failed on this input (a server fault)",
        503: "queue full or model not ready; retry after the Retry-After header's seconds",
        504: "the request waited longer than the per-request timeout",
    }
    return {
        status: {"model": ErrorResponse, "description": descriptions[status]} for status in statuses
    }


def features_request_body() -> Dict[str, Any]:
    """The OpenAPI ``requestBody`` of ``POST /v1/features`` (raw image bytes or multipart)."""
    binary = {"type": "string", "format": "binary"}
    content: Dict[str, Any] = {
        MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {
                    IMAGES_FIELD: {
                        "type": "array",
                        "items": binary,
                        "minItems": 1,
                        "description": "one file part per image, named 'images'",
                    }
                },
                "required": [IMAGES_FIELD],
            },
            "encoding": {
                IMAGES_FIELD: {"contentType": ", ".join((*IMAGE_MEDIA_TYPES, GENERIC_BINARY))}
            },
        }
    }
    for media_type in IMAGE_MEDIA_TYPES:
        content[media_type] = {"schema": binary}
    return {
        "required": True,
        "description": "one image as the raw body with its image content type, or several images "
        f"as multipart/form-data file parts named '{IMAGES_FIELD}'",
        "content": content,
    }


def features_success_response() -> Dict[int, Dict[str, Any]]:
    """The 200 entry of ``POST /v1/features``: JSON, or NumPy files chosen by the Accept header."""
    return {
        200: {
            "model": FeaturesResponse,
            "description": "features of every image, in request order. Accept: application/x-npy "
            "gives the features array of a single image as a .npy file; application/x-npz gives "
            "every array of every image, named '<index>/<field>' (e.g. '0/features', '0/boxes').",
            "content": {
                NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                NPZ_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
