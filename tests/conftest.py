"""Shared pytest fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

SHARED_DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real COCO-format data sets), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present (it is beside the repo on dev machines and CI, not in a user's clone)")
    return SHARED_DATA


@pytest.fixture
def write_coco(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Factory writing a tiny COCO data set under ``tmp_path``.

    ``write_coco(images, annotations, categories, name="ann.json", raw=None)`` writes one random
    RGB PNG per image entry (sized from its width/height; skipped when the entry has
    ``"_no_file": True``) into ``tmp_path/images`` and the JSON (``raw`` text instead, if given),
    and returns ``(ann_file, image_dir)``.  Keys starting with ``_`` are removed before writing.
    """

    def _write(
        images: list[dict[str, Any]] | None = None,
        annotations: list[dict[str, Any]] | None = None,
        categories: list[dict[str, Any]] | None = None,
        *,
        name: str = "ann.json",
        raw: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[Path, Path]:
        from PIL import Image

        image_dir = tmp_path / "images"
        image_dir.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        clean = []
        for im in images or []:
            if not im.get("_no_file"):
                arr = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
                Image.fromarray(arr).save(image_dir / im["file_name"])
            clean.append({k: v for k, v in im.items() if not k.startswith("_")})
        ann_file = tmp_path / name
        if raw is not None:
            ann_file.write_text(raw)
        else:
            data = {"images": clean, "annotations": annotations or [], "categories": categories or []}
            data.update(extra or {})
            ann_file.write_text(json.dumps(data))
        return ann_file, image_dir

    return _write
