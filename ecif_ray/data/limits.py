"""Caps on untrusted input (``data.samples`` enforces them), kept free of torch and webdataset so that
the job config and the command line can import them without loading either."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadLimits:
    """Caps on untrusted input; the defaults are far beyond any real image-text corpus.

    A member over ``max_member_bytes`` (as its tar header declares, so also a member of a
    compressed tar that would inflate past it) is never read into memory; an image whose header
    declares more than ``max_image_pixels`` pixels is never decoded (Pillow's own decompression-bomb
    error, at twice ``PIL.Image.MAX_IMAGE_PIXELS``, is reported the same way); a caption is cut to
    ``max_caption_chars`` characters.
    """

    max_member_bytes: int = 64 * 2**20
    max_image_pixels: int = 2**27
    max_caption_chars: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_member_bytes", "max_image_pixels", "max_caption_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReadLimits.{name}: must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = ReadLimits()
