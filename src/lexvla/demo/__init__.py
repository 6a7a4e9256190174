"""The main job: `lexvla demo` (see :mod:`lexvla.demo.pipeline`)."""

from __future__ import annotations

from lexvla.demo.pipeline import find_coco_mini, run_demo

__all__ = ["find_coco_mini", "run_demo"]
