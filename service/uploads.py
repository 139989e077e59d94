"""Reading image uploads from a request: byte limit, media types, multipart.

The body is read by us, chunk by chunk, so the upload limit holds for chunked bodies as well as
for an honest ``Content-Length``, and memory stays bounded by ``max_upload_bytes``. Two body kinds
are accepted:

- raw image bytes with an image content type (``Content-Type: image/jpeg``): one image;
- ``multipart/form-data`` with one or more file parts named ``images``.

A declared image type must agree with the bytes: a PNG sent as ``image/jpeg`` is refused with 415
(it points at a client bug), while bytes that are no known image at all are left to the image
reader, which answers 400 with its specific reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, List, Optional

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

#: Media types we decode, with the magic bytes that identify each.
IMAGE_MEDIA_TYPES = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/gif",
    "image/tiff",
)
_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-ms-bmp": "image/bmp"}
#: Accepted on multipart parts (browsers and curl send it for unknown files); the bytes decide.
GENERIC_BINARY = "application/octet-stream"
MULTIPART = "multipart/form-data"
#: The form field that carries images in a multipart body.
IMAGES_FIELD = "images"


@dataclass(frozen=True)
class Upload:
    """One uploaded image: its bytes and where it came from (for error messages)."""

    data: bytes
    label: str
    media_type: str


def base_media_type(content_type: Optional[str]) -> str:
    """``'image/JPEG; q=1'`` -> ``'image/jpeg'``; common aliases map to the standard name."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff_image_type(data: bytes) -> Optional[str]:
    """The image media type the leading bytes announce, or None when they announce none we know."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def check_media_type(declared: str, data: bytes, label: str) -> None:
    """Refuse (415) a declared type we do not decode, or one the bytes contradict."""
    if declared != GENERIC_BINARY and declared not in IMAGE_MEDIA_TYPES:
        shown = declared or "none"
        raise UnsupportedMediaType(
            f"{label}: unsupported content type '{shown}'; send one of "
            f"{', '.join(IMAGE_MEDIA_TYPES)}"
        )
    actual = sniff_image_type(data)
    if declared in IMAGE_MEDIA_TYPES and actual is not None and actual != declared:
        raise UnsupportedMediaType(
            f"{label}: content type '{declared}' does not match the data, which is {actual}"
        )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``max_bytes``.

    Raises starlette's ``ClientDisconnect`` if the client goes away mid-upload.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise BadRequest(f"invalid Content-Length header: {declared!r}") from None
        if declared_bytes > max_bytes:
            raise PayloadTooLarge(
                f"upload of {declared_bytes} bytes exceeds the limit of {max_bytes} bytes"
            )
    chunks: List[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _parse_multipart(headers: Headers, body: bytes, max_images: int) -> List[Upload]:
    # +1 so that "too many images" is our own message rather than the parser's.
    parser = MultiPartParser(headers, _once(body), max_files=max_images + 1, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    try:
        unexpected = sorted({key for key in form.keys() if key != IMAGES_FIELD})
        if unexpected:
            raise BadRequest(
                f"unexpected form field(s) {', '.join(map(repr, unexpected))}; "
                f"send images as file parts named '{IMAGES_FIELD}'"
            )
        parts = form.getlist(IMAGES_FIELD)
        if len(parts) > max_images:
            raise PayloadTooLarge(f"{len(parts)} images in one request; the limit is {max_images}")
        uploads: List[Upload] = []
        for index, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise BadRequest(f"form field '{IMAGES_FIELD}' #{index} is text, not a file part")
            label = f"image {index}" + (f" ({part.filename})" if part.filename else "")
            data = await part.read()
            media_type = base_media_type(part.content_type) or GENERIC_BINARY
            check_media_type(media_type, data, label)
            uploads.append(Upload(data=data, label=label, media_type=media_type))
        if not uploads:
            raise BadRequest(f"the multipart body has no file parts named '{IMAGES_FIELD}'")
        return uploads
    finally:
        await form.close()


async def read_uploads(request: Request, *, max_bytes: int, max_images: int) -> List[Upload]:
    """All images of a feature request, validated for size and media type (not yet decoded)."""
    content_type = base_media_type(request.headers.get("content-type"))
    if not content_type:
        raise UnsupportedMediaType(
            f"missing Content-Type; send an image type ({', '.join(IMAGE_MEDIA_TYPES)}) or "
            f"{MULTIPART}"
        )
    if content_type != MULTIPART and content_type not in IMAGE_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"unsupported content type '{content_type}'; send an image type "
            f"({', '.join(IMAGE_MEDIA_TYPES)}) or {MULTIPART} with file parts named "
            f"'{IMAGES_FIELD}'"
        )
    body = await read_body(request, max_bytes)
    if not body:
        raise BadRequest("empty request body: no image sent")
    if content_type == MULTIPART:
        return await _parse_multipart(request.headers, body, max_images)
    check_media_type(content_type, body, "body")
    return [Upload(data=body, label="image 0", media_type=content_type)]
