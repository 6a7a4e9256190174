"""lexvla: interpretable image-text alignment through a unified lexical representation (LexVLA).

Quick start::

    import lexvla
    model = lexvla.create_model("small-offline")      # or "tiny", "paper", a run or checkpoint folder
    img = model.encode_image(["photo.jpg"]).image_weights  # (1, V) sparse-able, non-negative
    txt = model.encode_text(["a dog catches a frisbee"]).text_weights
    print(model.top_words(img, 10), (img @ txt.T).item())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LexVLA", "LexVLAError", "__version__", "create_model", "get_preset", "list_presets"]

from lexvla.errors import LexVLAError
from lexvla.presets import get_preset, list_presets

if TYPE_CHECKING:
    from lexvla.models.lexvla import LexVLA


def __getattr__(name: str) -> Any:
    # Heavy imports (torch, transformers) happen on first use, so `import lexvla` stays cheap.
    if name == "LexVLA":
        from lexvla.models.lexvla import LexVLA

        return LexVLA
    if name == "create_model":
        from lexvla.models.factory import create_model

        return create_model
    raise AttributeError(f"module 'lexvla' has no attribute {name!r}")
