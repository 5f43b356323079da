"""Temporary alias (moved to swc_service.samples)."""

from swc_service.samples import *  # noqa: F403
from swc_service.samples import photo, photo_bytes  # noqa: F401
