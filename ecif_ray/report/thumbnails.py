"""The images of the pairs the report shows, fetched from their shards, as small PNG thumbnails."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

from PIL import Image


def fetch_images(spec: str | list[str] | None, wanted: Iterable[tuple[str, str]],
                 storage_options: Mapping[str, Any] | None = None) -> tuple[dict[tuple[str, str], Image.Image],
                                                                           list[str]]:
    """The images of ``wanted`` (shard, key) pairs from the shards named by ``spec``.

    Only the shards that hold a wanted pair are opened, and each is read only up to its last
    wanted key. Returns the images found and notes on what could not be found (never raises on
    missing or broken input: the report then shows a placeholder).
    """
    from ecif_ray.data.samples import Sample, ShardUnavailable, iter_shard
    from ecif_ray.data.shards import list_shards

    wanted_by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        wanted_by_shard.setdefault(shard, set()).add(key)
    if not wanted_by_shard:
        return {}, []
    if not spec:
        return {}, ["the manifest records no shard location for these images"]
    try:
        shards = list_shards(spec, storage_options)
    except Exception as exc:  # moved, deleted, unreachable storage
        return {}, [f"cannot list the shards {spec!r}: {exc}"]
    images: dict[tuple[str, str], Image.Image] = {}
    notes: list[str] = []
    by_name = {s.name: s for s in shards}
    for name, keys in sorted(wanted_by_shard.items()):
        shard = by_name.get(name)
        if shard is None:
            notes.append(f"shard {name} is not among the shards at {spec!r}")
            continue
        remaining = set(keys)
        try:
            for item in iter_shard(shard, storage_options):
                if isinstance(item, Sample):
                    if item.key in remaining:
                        images[name, item.key] = item.image
                        remaining.discard(item.key)
                        if not remaining:
                            break
                elif item.stage == "read":
                    notes.append(item.message)
        except ShardUnavailable as exc:  # moved or unreachable since the run: the report goes on without it
            notes.append(str(exc))
        if remaining:
            notes.append(f"shard {name}: {len(remaining)} image(s) not found (e.g. key {sorted(remaining)[0]!r})")
    return images, notes


def thumbnail(image: Image.Image, size: int = 128) -> bytes:
    """A PNG of at most ``size`` pixels a side; small images (8×8 digits) are enlarged without blur."""
    image = image.convert("RGB")
    longest = max(image.size)
    if longest < size:
        factor = max(1, size // longest)
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    else:
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
