"""Run logging: a progress bar (loss, throughput, ETA), `metrics.jsonl` and TensorBoard.

`metrics.jsonl` holds one JSON object per logged step with at least `step` and `loss`. On resume, lines
of steps after the resumed checkpoint are dropped first, so a resumed run never logs a step twice.
It is strict JSON: a non-finite value (a NaN loss) is written as `null`, never as a bare `NaN`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any

from lexvla._atomic import atomic_write_text, is_disk_full, reporting_full_disk

logger = logging.getLogger(__name__)


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.start = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self.file = self.path.open("a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        self.tb = _tensorboard(run_dir / "tb")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if _step_of(line) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def step(self, step: int, metrics: dict[str, float], *, log: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            elapsed = time.perf_counter() - self.start
            rate = metrics.get("samples", 0.0) * (step - self.start_step) / max(elapsed, 1e-9)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", samples_s=f"{rate:.1f}", refresh=False
            )
            self.bar.update(1)
        if log:
            self._write({"step": step, **metrics})

    def eval(self, step: int, results: dict[str, Any]) -> None:
        if self.enabled:
            self._write({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
            logger.info("step %d eval: %s", step, json.dumps(results))

    def _write(self, record: dict[str, Any]) -> None:
        with reporting_full_disk(self.path):
            self.file.write(strict_json(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            with reporting_full_disk(self.path.parent / "tb"):
                for key, value in record.items():
                    if key != "step" and isinstance(value, int | float):
                        self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        for close in ([self.tb.close] if self.tb is not None else []) + [self.file.close]:
            try:
                close()
            except Exception as err:  # a full disk: already reported by the write that failed
                if not is_disk_full(err):
                    raise
                logger.warning("run log of %s not fully written: %s", self.path.parent, err)


def strict_json(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that writes NaN and ±inf as `null` (bare `NaN` is not JSON) and numbers of other
    types (numpy, tensors) as floats."""
    return json.dumps(_finite_or_none(value), allow_nan=False, default=_number, **kwargs)


def _number(value: Any) -> float | None:
    return _finite_or_none(float(value))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed run: drop it


def _tensorboard(folder: Path):  # noqa: ANN202 - SummaryWriter is optional
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info(
            "tensorboard is not installed (pip install 'lexvla[train]'): TensorBoard logs off"
        )
        return None
    return SummaryWriter(str(folder))
