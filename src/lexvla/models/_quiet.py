"""Quiet third-party libraries: Hugging Face's per-tensor progress bars while loading (lexvla shows its
own progress), and the third-party deprecation warnings a lexvla user can do nothing about.

Those warnings are hidden at the edge only (`lexvla` commands call :func:`hide_known_warnings`);
importing lexvla changes no warning filter, so library users and the test suite still see them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

# (category, message regex, regex of the module that raises it) of each known third-party warning.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # peft's get_peft_model reads PreTrainedModel.is_gradient_checkpointing, deprecated in
    # transformers 5 (the LoRA text tower, e.g. the tiny and paper presets).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\."),
)


def hide_known_warnings() -> None:
    """Ignore :data:`KNOWN_WARNINGS` in this process from now on (the CLI's entry calls it)."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
