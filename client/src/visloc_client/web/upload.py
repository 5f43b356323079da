"""Upload checks done by the web app before an image goes to the Locate service.

The type is sniffed from the file's first bytes (never trusted from the file name or the
browser's Content-Type); the size is checked against the limit from Content-Length before the
body is read (``visloc_client.web.body`` reads it). Everything happens in memory: no temporary
files.
"""

from __future__ import annotations

# The formats the Locate service decodes (locator.proto, LocateRequest.image), by magic bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WebP", "HEIC", "AVIF", "GIF", "BMP", "TIFF")
ACCEPT_ATTRIBUTE = "image/jpeg,image/png,image/webp,image/heic,image/heif,image/avif,image/gif,image/bmp,image/tiff"

# Room for the multipart envelope (boundaries, part headers) on top of the image itself.
MULTIPART_OVERHEAD = 64 * 1024

# Well-known files that are not (supported) images, so that the message can say what was sent.
_NOT_IMAGES: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF-", 0, "a PDF document"),
    (b"PK\x03\x04", 0, "a ZIP archive (or an Office document)"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive"),
    (b"Rar!", 0, "a RAR archive"),
    (b"\x7fELF", 0, "a program (ELF)"),
    (b"MZ", 0, "a Windows program"),
    (b"ID3", 0, "an MP3 audio file"),
    (b"OggS", 0, "an Ogg media file"),
    (b"fLaC", 0, "a FLAC audio file"),
    (b"\x1aE\xdf\xa3", 0, "a WebM/Matroska video"),
    (b"8BPS", 0, "a Photoshop document"),
    (b"\x00\x00\x01\x00", 0, "a Windows icon"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


class UploadError(Exception):
    """An upload refused by the web app; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, title: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.title = title
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "title": self.title, "message": self.message, "reason": ""}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes, if it is one the service accepts."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:  # ISO-BMFF: what phones save
        return "AVIF" if data[8:11] == b"avi" else "HEIC"
    return None


def describe(data: bytes) -> str:
    """A few words on what a non-image upload looks like, for the error message."""
    if not data:
        return "an empty file"
    if data[4:8] == b"ftyp":
        return "an MP4/QuickTime video"
    if data[:4] == b"RIFF":
        return "a RIFF media file (WAV/AVI)"
    for magic, offset, what in _NOT_IMAGES:
        if data[offset : offset + len(magic)] == magic:
            return what
    head = data[:2048].lstrip(b"\xef\xbb\xbf").lstrip()
    if head[:1] == b"<":
        low = head[:256].lower()
        if b"<svg" in low or (b"<?xml" in low and b"svg" in head.lower()):
            return "an SVG drawing (vector images are not supported)"
        return "an HTML or XML document"
    if head[:1] in (b"{", b"["):
        return "JSON text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "text"


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 100 * 1024 else f"{n / 1024:.0f} KB"


def too_large(size: int, limit: int) -> UploadError:
    return UploadError(
        413,
        "TOO_LARGE",
        "The file is too large",
        f"The file is {_mb(size)}; the limit is {_mb(limit)}. Try a smaller or more compressed photo.",
    )


def check_declared_length(length: int | None, limit: int, *, multipart: bool) -> None:
    """Refuse from the Content-Length alone, before reading the body."""
    if length is None:
        raise UploadError(411, "LENGTH_REQUIRED", "No upload size given", "Send the image with a Content-Length.")
    if length <= 0:
        raise UploadError(400, "EMPTY", "The file is empty", "Choose a photo to upload.")
    if length > limit + (MULTIPART_OVERHEAD if multipart else 0):
        raise too_large(length, limit)


def check_image(data: bytes, limit: int) -> str:
    """The sniffed format of an acceptable image, else ``UploadError``."""
    if not data:
        raise UploadError(400, "EMPTY", "The file is empty", "Choose a photo to upload.")
    if len(data) > limit:
        raise too_large(len(data), limit)
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(
            415,
            "NOT_AN_IMAGE",
            "This file is not a photo the service can read",
            f"It looks like {describe(data)}. Upload a {', '.join(ACCEPTED_FORMATS[:-1])} "
            f"or {ACCEPTED_FORMATS[-1]} image.",
        )
    return fmt


def is_multipart(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "multipart/form-data"
