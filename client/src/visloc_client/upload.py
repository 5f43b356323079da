"""What a Locate request carries: the image file, or the model input made on the caller's side.

Preprocessing a 12 MP photo costs the service some 25 times what the model input costs it,
and its file is 4-10 times the size of that input. A client with the ``preprocess`` extra
(Pillow and numpy) runs the service's own preprocessing (:mod:`visloc_client.preprocessing`,
with the recipe GetInfo gives) and sends the uint8 pixels instead, losslessly: the answer is
the same, bit for bit. Modes:

* ``"auto"`` (the default): pixels when that is possible and smaller than the file (a phone
  photo), the file otherwise (a small JPEG is cheaper to send and decode as it is).
* ``"client"``: pixels whenever this side can decode the image.
* ``"server"``: always the file (the behaviour of a client without the extra).

Whatever this side cannot decode is sent as the file, so the service gives its own answer
(a format only it supports, or INVALID_ARGUMENT with its reason).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visloc_client.errors import ImageError
from visloc_client.v1 import locator_pb2 as pb

if TYPE_CHECKING:
    from visloc_client.preprocessing import Recipe

MODES = ("auto", "client", "server")


def available() -> bool:
    """Whether this side can preprocess (the ``preprocess`` extra is installed)."""
    try:
        import numpy  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError:
        return False
    return True


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"preprocess must be one of {MODES}, not {mode!r}")
    if mode == "client" and not available():
        raise ValueError("preprocess='client' needs Pillow and numpy: pip install 'visloc-client[preprocess]'")
    return mode


def recipe_of(info: pb.GetInfoResponse) -> Recipe | None:
    """The service's preprocessing recipe, or None when it does not take pixels (an older
    service) or this side cannot preprocess."""
    if not info.accepts_pixels or not available():
        return None
    from visloc_client.preprocessing import Limits, Recipe

    return Recipe(
        crop=info.preprocessing == "center_crop_300",
        exif_transpose=info.exif_transpose,
        limits=Limits(max_pixels=info.max_image_pixels, max_side=info.max_input_side),
    )


@dataclass(frozen=True)
class Upload:
    """How this client sends images: ``mode`` and the service's ``recipe`` (None: files only)."""

    mode: str = "server"
    recipe: Recipe | None = None

    def fields(self, data: bytes) -> dict[str, Any]:
        """The LocateRequest fields that carry ``data``: ``{"image": ...}`` or ``{"pixels": ...}``."""
        if self.mode == "server" or self.recipe is None:
            return {"image": data}
        pixels = self._pixels(data)
        return {"image": data} if pixels is None else {"pixels": pixels}

    def _pixels(self, data: bytes) -> pb.Pixels | None:
        from PIL import Image

        from visloc_client.preprocessing import SHORT_SIDE, preprocess, resized_size, to_pixels

        recipe = self.recipe
        assert recipe is not None
        if self.mode == "auto":  # worth it only when the model input is smaller than the file
            try:
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
                width, height = (SHORT_SIDE, SHORT_SIDE) if recipe.crop else resized_size(w, h)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                return None
            if width * height * 3 >= len(data):
                return None
        try:
            image = preprocess(data, recipe.limits, exif_transpose=recipe.exif_transpose, crop=recipe.crop)
        except ImageError:
            return None  # the service says why (or decodes what this side cannot)
        height, width = image.shape
        return pb.Pixels(
            data=to_pixels(image), height=height, width=width,
            source_width=image.source_width, source_height=image.source_height,
            preprocessing=recipe.preprocessing, exif_transpose=recipe.exif_transpose,
        )  # fmt: skip


def file_request(request: pb.LocateRequest, data: bytes) -> pb.LocateRequest:
    """``request`` carrying the file instead of pixels (after a FAILED_PRECONDITION: the
    service's recipe changed, or another replica has another)."""
    out = pb.LocateRequest()
    out.CopyFrom(request)
    out.ClearField("pixels")
    out.image = data
    return out
