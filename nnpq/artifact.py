"""The quantized model file (``.nnpq``): one safetensors file, manifest in its metadata.

Tensors are the quantized model's state dict (int8 codes, float32 scales, the FP32
rest); the JSON manifest names the source model and its sha256, the plan, the nnpq and
format versions, and a sha256 over all tensors. Nothing is ever unpickled.

A file is untrusted input: `read_artifact` checks everything before anything is built (the
header's size and JSON, the manifest field by field, the tensor table, the checksum, then
every tensor's dtype, shape and value range against the layout the plan gives the named
architecture), and every failure is one `NnpqError` line naming the file and the fix.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as st_save

import nnpq
from nnpq.atomic_io import write_bytes_atomic
from nnpq.errors import NnpqError
from nnpq.models.fp32 import MODEL_SPECS, assemble_architecture, n_layers
from nnpq.spec.formats import ACTIVATION_MODES, ACTIVATION_RANGES, GRANULARITIES, KINDS, code_range
from nnpq.spec.packing import (CODED, PACKED, decode_codes, narrows_to_bf16, packed_bytes, store_codes,
                                stored_code_bytes, stored_float_bytes, unpack_codes)
from nnpq.spec.plan import QuantPlan

FORMAT_NAME = "nnpq"
FORMAT_VERSION = 3  # 2: integer codes may be entropy-coded (coded_shapes); 3: float32 tensors as bfloat16 (bf16_tensors)
MANIFEST_KEY = "nnpq_manifest"
MAX_HEADER_BYTES = 100_000_000  # an ANI-2x header is ~0.2 MB; a larger claim is damage or an attack
FIX = "re-create it with 'nnpq quantize'"


@dataclass
class Artifact:
    """A quantized model as stored: its manifest, plan and tensors."""

    manifest: dict[str, Any]
    plan: QuantPlan
    tensors: dict[str, torch.Tensor]

    @property
    def model_name(self) -> str:
        return self.manifest["source"]["model"]


_LAYER_TENSOR = re.compile(r"members\.(\d+)\.atomics\.(\w+)\.(?:layers\.(\d+)|final_layer)\.(\w+)$")


def _code_tensors(tensors: dict[str, torch.Tensor], plan: QuantPlan, n_hidden: int):
    """``(key, bits, lowest)`` of every integer code tensor (``qweight`` of an integer layer)."""
    for key in tensors:
        match = _LAYER_TENSOR.search(key)
        if match is None or match[4] != "qweight":
            continue
        member, element, layer = int(match[1]), match[2], match[3]
        fmt = plan.format_for(member, element, n_hidden if layer is None else int(layer))
        if fmt.is_integer:
            yield key, fmt.bits, code_range(fmt)[0]


def stored_tensor_bytes(model: torch.nn.Module, plan: QuantPlan) -> int:
    """Bytes of tensor data ``save_artifact`` would write for ``model`` (codes as `store_codes`
    stores them, floats as `stored_float_bytes`; header and manifest not included)."""
    tensors = model.state_dict()
    codes = {key: bits for key, bits, _ in _code_tensors(tensors, plan, n_layers(model) - 1)}
    return sum(stored_code_bytes(t, codes[k]) if k in codes else stored_float_bytes(t) for k, t in tensors.items())


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of all tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_artifact(path: str | os.PathLike, model: torch.nn.Module, plan: QuantPlan,
                  source: dict[str, Any], metrics: dict[str, Any] | None = None,
                  domain: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state and its manifest to ``path`` atomically.

    Args:
        model: the quantized TorchANI model (its ``state_dict`` is stored).
        plan: the plan it was built with.
        source: ``{"model": name, "sha256": ..., ...}`` describing the FP32 source.
        metrics: optional evaluation results to keep beside the plan.
        domain: optional calibrated applicability domain (`nnpq.models.domain.Domain.to_manifest`).
    """
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    n_hidden = n_layers(model) - 1
    shapes: dict[str, dict[str, list[int]]] = {PACKED: {}, CODED: {}}
    for key, bits, lowest in list(_code_tensors(tensors, plan, n_hidden)):
        how, stored = store_codes(tensors[key], bits, lowest)
        if how is not None:
            shapes[how][key] = list(tensors[key].shape)
            tensors[key] = stored
    narrowed = sorted(k for k, t in tensors.items() if narrows_to_bf16(t))  # exact: scales sit on its grid
    for key in narrowed:
        tensors[key] = tensors[key].to(torch.bfloat16)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "nnpq_version": nnpq.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "plan": plan.to_dict(),
        "tensors_sha256": tensors_sha256(tensors),
        "packed_shapes": shapes[PACKED],
        "coded_shapes": shapes[CODED],
        "bf16_tensors": narrowed,
        "metrics": metrics or {},
    }
    if domain is not None:
        manifest["domain"] = domain
    data = st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
    return write_bytes_atomic(path, data)


# --- reading ---------------------------------------------------------------------------------

# safetensors dtype names of the types torch can hold; the layout check then demands exact ones
_ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
              "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
              "F64": torch.float64}


def _not_valid(name: str, detail: str = "truncated, corrupt or not safetensors") -> NnpqError:
    return NnpqError(f"{name} is not a valid nnpq model file ({detail}); {FIX}")


def _damaged(name: str, detail: str) -> NnpqError:
    return NnpqError(f"{name} has a damaged nnpq manifest ({detail}); {FIX}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _parse_json(raw: bytes | str) -> Any:
    """Plain UTF-8 JSON without duplicate keys, else ValueError (deep nesting included)."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError, OverflowError, MemoryError) as exc:
        raise ValueError(type(exc).__name__) from None


def _show(value: Any) -> str:
    """A short one-line rendering of a JSON value for messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


_TYPES: dict[str, Callable[[Any], bool]] = {
    "a string": lambda v: isinstance(v, str),
    "an integer": _is_int,
    "true or false": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a string or null": lambda v: v is None or isinstance(v, str),
    "an integer or null": lambda v: v is None or _is_int(v),
    "a finite number": _is_finite_number,
    "a number or null": lambda v: v is None or _is_finite_number(v),
}


class _Fields:
    """Field-by-field checks of one JSON object of the manifest; failures name the field's path."""

    def __init__(self, obj: Any, where: str, name: str, allowed: set[str] | None = None) -> None:
        self.where, self.name = where, name
        if not isinstance(obj, dict):
            raise _damaged(name, f"{where.rstrip('.') or 'manifest'} must be an object, got {_show(obj)}")
        self.obj = obj
        if allowed is not None:
            self.only(allowed)

    def only(self, allowed: set[str]) -> None:
        extra = sorted(set(self.obj) - allowed)
        if extra:
            raise _damaged(self.name, f"unexpected field {self.where}{_show(extra[0])[1:-1]}")

    def get(self, key: str, kind: str, default: Any = ..., check: Callable[[Any], bool] | None = None,
            expect: str = "") -> Any:
        if key not in self.obj:
            if default is ...:
                raise _damaged(self.name, f"missing field {self.where}{key}")
            return default
        value = self.obj[key]
        if not _TYPES[kind](value):
            raise _damaged(self.name, f"field {self.where}{key} must be {kind}, got {_show(value)}")
        if check is not None and not check(value):
            raise _damaged(self.name, f"field {self.where}{key} must be {expect}, got {_show(value)}")
        return value


@dataclass(frozen=True)
class _Architecture:
    """What a plan may address in a model: its elements, ensemble members and layers per network."""

    symbols: tuple[str, ...]
    members: int
    layers: int


@functools.lru_cache(maxsize=None)
def _architecture(model_name: str) -> _Architecture:
    model = assemble_architecture(model_name)
    return _Architecture(tuple(model.symbols), len(model.neural_networks.members), n_layers(model))


def _check_plan(data: Any, model_name: str, name: str) -> QuantPlan:
    """The plan, every rule's fields typed and in range for ``model_name``."""
    arch = _architecture(model_name)
    plan = _Fields(data, "plan.", name, {"rules", "rounding", "description", "extra"})
    rules = plan.get("rules", "a list")
    plan.get("rounding", "a string", "nearest")
    plan.get("description", "a string", "")
    plan.get("extra", "an object", {})
    for i, raw in enumerate(rules):
        where = f"plan.rules[{i}]."
        rule = _Fields(raw, where, name, {"element", "layer", "member", "weight", "activation", "equalize", "damp",
                                            "rounding"})
        rule.get("element", "a string or null", None, lambda v: v is None or v in arch.symbols,
                 f"one of {', '.join(arch.symbols)} (the elements of {model_name})")
        rule.get("layer", "an integer or null", None, lambda v: v is None or 0 <= v < arch.layers,
                 f"a layer index from 0 to {arch.layers - 1}")
        rule.get("member", "an integer or null", None, lambda v: v is None or 0 <= v < arch.members,
                 f"an ensemble member from 0 to {arch.members - 1}")
        rule.get("equalize", "true or false", False)
        rule.get("damp", "a number or null", None, lambda v: v is None or v > 0, "a positive damping or null")
        rule.get("rounding", "a string or null", None, lambda v: v in (None, "nearest"), "'nearest' or null")
        weight = _Fields(rule.get("weight", "an object"), where + "weight.", name,
                         {"kind", "bits", "granularity", "group_size", "symmetric"})
        kind = weight.get("kind", "a string", check=lambda v: v in KINDS, expect=f"one of {', '.join(KINDS)}")
        integer = kind == "int"
        weight.get("bits", "an integer", check=lambda v: not integer or 2 <= v <= 8, expect="from 2 to 8")
        granularity = weight.get("granularity", "a string", check=lambda v: v in GRANULARITIES,
                                 expect=f"one of {', '.join(GRANULARITIES)}")
        weight.get("group_size", "an integer", check=lambda v: v > 0 if integer and granularity == "group" else v >= 0,
                   expect="a positive number of inputs per scale" if granularity == "group" else "0 or more")
        weight.get("symmetric", "true or false")
        activation = _Fields(rule.get("activation", "an object", {}), where + "activation.", name,
                             {"mode", "range", "percentile"})
        activation.get("mode", "a string", "none", lambda v: v in ACTIVATION_MODES,
                       f"one of {', '.join(ACTIVATION_MODES)}")
        activation.get("range", "a string", "mse", lambda v: v in ACTIVATION_RANGES,
                       f"one of {', '.join(ACTIVATION_RANGES)}")
        activation.get("percentile", "a finite number", 99.99, lambda v: 0 < v <= 100, "a percentile in (0, 100]")
    try:
        return QuantPlan.from_dict(data)
    except NnpqError as exc:  # the spec's own checks, should the schema above ever lag behind them
        raise _damaged(name, str(exc)) from None


def _check_domain(data: Any, source: Any, name: str) -> None:
    """The calibrated applicability domain: per element of the model, finite non-negative maxima."""
    domain = _Fields(data, "domain.", name, {"aev_max", "symbols", "factor", "floor"})
    domain.get("factor", "a finite number")
    domain.get("floor", "a finite number")
    symbols = domain.get("symbols", "a list")
    model = source.get("model") if isinstance(source, dict) else None
    known = _architecture(model).symbols if model in MODEL_SPECS else ()
    if list(symbols) != list(known):
        raise _damaged(name, f"domain.symbols must be the model's elements {list(known)}, got {_show(symbols)}")
    maxima = _Fields(domain.get("aev_max", "an object"), "domain.aev_max.", name, set(known))
    for element in maxima.obj:
        maxima.get(element, "a list", check=lambda v: all(_TYPES["a finite number"](x) and x >= 0 for x in v),
                   expect="a list of finite non-negative numbers")


def _check_manifest(manifest: Any, name: str) -> QuantPlan:
    """Every manifest field typed and in range; returns the plan."""
    fields = _Fields(manifest, "", name)
    fields.get("format", "a string", check=lambda v: v == FORMAT_NAME, expect=f"'{FORMAT_NAME}'")
    # the version decides how the rest is laid out, so it is checked before anything else is read
    version = fields.get("format_version", "an integer")
    if version > FORMAT_VERSION:
        raise NnpqError(f"{name} uses nnpq format {version}, newer than this nnpq "
                        f"({nnpq.__version__}, format {FORMAT_VERSION}); upgrade nnpq")
    if version < 1:
        raise _damaged(name, f"format_version {version} is not a format version; nnpq writes 1 to {FORMAT_VERSION}")
    fields.only({"format", "format_version", "nnpq_version", "created", "source", "plan", "tensors_sha256",
                 "packed_shapes", "coded_shapes", "bf16_tensors", "metrics", "domain"})
    if "domain" in manifest:
        _check_domain(fields.get("domain", "an object"), manifest.get("source", {}), name)
    fields.get("nnpq_version", "a string")
    fields.get("created", "a string")
    fields.get("tensors_sha256", "a string", check=lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None,
               expect="64 hexadecimal digits")
    fields.get("metrics", "an object", {})
    for field in ("packed_shapes", "coded_shapes"):
        for key, shape in fields.get(field, "an object", {}).items():
            if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
                raise _damaged(name, f"{field}[{_show(key)}] must be a list of sizes, got {_show(shape)}")
    fields.get("bf16_tensors", "a list", [], check=lambda v: all(isinstance(k, str) for k in v) and
               len(set(v)) == len(v), expect="a list of distinct tensor names")
    raw_source = fields.get("source", "an object")
    source = _Fields(raw_source, "source.", name, set(raw_source))
    source.get("model", "a string", check=lambda v: v in MODEL_SPECS, expect=f"one of {', '.join(MODEL_SPECS)}")
    for key in source.obj:
        source.get(key, "a string")
    return _check_plan(fields.get("plan", "an object"), manifest["source"]["model"], name)


def _split_header(data: bytes, name: str) -> tuple[dict[str, Any], memoryview]:
    """The safetensors header (parsed once, size capped) and the tensor bytes after it."""
    if len(data) < 8:
        raise _not_valid(name)
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES:
        raise _not_valid(name, f"its header claims {size} bytes, over the {MAX_HEADER_BYTES // 10**6} MB limit")
    if size > len(data) - 8:
        raise _not_valid(name)
    try:
        header = _parse_json(data[8:8 + size])
    except ValueError:
        raise _not_valid(name) from None
    if not isinstance(header, dict):
        raise _not_valid(name)
    return header, memoryview(data)[8 + size:]


def _read_manifest(header: dict[str, Any], name: str) -> dict[str, Any]:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _not_valid(name, "its metadata is not a table of strings")
    if MANIFEST_KEY not in meta:
        raise NnpqError(f"{name} is a safetensors file but not an nnpq model (no nnpq manifest); "
                        "create one with 'nnpq quantize'")
    try:
        return _parse_json(meta[MANIFEST_KEY])
    except ValueError as exc:
        raise _damaged(name, f"not valid JSON: {exc}") from None


def _read_tensors(header: dict[str, Any], body: memoryview, name: str) -> dict[str, torch.Tensor]:
    """The tensors the header lists; their byte ranges must tile the data exactly, as safetensors demands."""
    entries = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _not_valid(name, f"malformed entry for tensor {_show(key)}")
        dtype = _ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise _not_valid(name, f"tensor {_show(key)} has unknown dtype {_show(entry['dtype'])}")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise _not_valid(name, f"tensor {_show(key)} has a malformed shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(n) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _not_valid(name, f"tensor {_show(key)} has malformed data offsets")
        if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
            raise _not_valid(name, f"tensor {_show(key)} has {offsets[1] - offsets[0]} bytes for shape {_show(shape)}")
        entries.append((offsets[0], offsets[1], key, dtype, shape))
    entries.sort(key=lambda e: e[:2])
    end = 0
    for begin, stop, key, _, _ in entries:
        if begin != end:
            raise _not_valid(name, f"tensor data overlapping or with gaps at {_show(key)}")
        end = stop
    if end != len(body):
        raise _not_valid(name, "tensor data truncated" if end > len(body) else "bytes after the tensor data")
    buffer = bytearray(body)  # one writable copy; the tensors are views into it
    tensors = {}
    for begin, stop, key, dtype, shape in entries:
        if begin == stop:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif begin % dtype.itemsize:  # misaligned for its dtype: copy into aligned storage first
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=stop - begin, offset=begin)
            tensors[key] = raw.clone().view(dtype).reshape(shape)
        else:
            tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=(stop - begin) // dtype.itemsize,
                                            offset=begin).reshape(shape)
    return tensors


@dataclass(frozen=True)
class _Layout:
    """The tensors a plan gives a model: name -> (shape, dtype), and the values of its index tables."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    fixed: dict[str, torch.Tensor]


@functools.lru_cache(maxsize=16)
def _layout(model_name: str, rules_json: str) -> _Layout:
    # the runtime's own empty model is the one definition of the layout (no copy of it here)
    from nnpq.models.runtime import empty_runtime

    state = empty_runtime(model_name, QuantPlan.from_dict({"rules": json.loads(rules_json)})).state_dict()
    shapes = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    fixed = {key: t.clone() for key, t in state.items()
             if not t.is_floating_point() and _LAYER_TENSOR.search(key) is None}
    return _Layout(shapes, fixed)


def _layer_of(key: str, arch: _Architecture) -> tuple[tuple[int, str, int], str] | None:
    """``((member, element, layer), buffer name)`` of a layer tensor's key, else ``None``."""
    match = _LAYER_TENSOR.search(key)
    if match is None:
        return None
    layer = arch.layers - 1 if match[3] is None else int(match[3])
    return (int(match[1]), match[2], layer), match[4]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unpack_and_check_layout(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], plan: QuantPlan,
                             name: str) -> dict[str, torch.Tensor]:
    """Integer codes unpacked or decoded; then every tensor's name, dtype and shape exactly as the layout says."""
    model_name = manifest["source"]["model"]
    arch = _architecture(model_name)
    layout = _layout(model_name, json.dumps(plan.to_dict()["rules"], sort_keys=True))  # only rules shape it

    def misfit(detail: str) -> NnpqError:
        return NnpqError(f"{name} does not fit the {model_name} architecture with its plan ({detail}); {FIX}")

    missing, extra = sorted(set(layout.shapes) - set(tensors)), sorted(set(tensors) - set(layout.shapes))
    if missing or extra:
        key = (missing or extra)[0]
        more = len(missing or extra) - 1
        raise misfit(f"{'missing' if missing else 'unexpected'} tensor {_show(key)[1:-1]}"
                     + (f" and {more} more" if more else ""))
    packed, coded = manifest.get("packed_shapes", {}), manifest.get("coded_shapes", {})
    codes = {}  # integer code tensors: narrow ones must be packed or coded, 8-bit ones may be coded
    for key in layout.shapes:
        where = _layer_of(key, arch)
        if where is not None and where[1] == "qweight":
            codes[key] = plan.format_for(*where[0])
    for field, entries in (("packed_shapes", packed), ("coded_shapes", coded)):
        stray = sorted(k for k in entries if k not in codes
                       or (field == "packed_shapes" and (codes[k].bits == 8 or k in coded)))
        if stray:
            raise _damaged(name, f"{field} has a stray entry for {_show(stray[0])[1:-1]}")
    narrow = sorted(k for k, fmt in codes.items() if fmt.bits < 8 and k not in packed and k not in coded)
    if narrow:
        raise _damaged(name, f"packed_shapes lacks {_show(narrow[0])[1:-1]}")
    out = dict(tensors)
    for field, entries in (("packed_shapes", packed), ("coded_shapes", coded)):
        for key, given in entries.items():
            fmt, (shape, _) = codes[key], layout.shapes[key]
            if tuple(given) != shape:
                shown = given if len(given) <= 8 else f"a list of {len(given)} sizes"
                raise _damaged(name, f"{field}[{key!r}] is {shown}, the layer is {list(shape)}")
            t = tensors[key]
            if field == "packed_shapes":
                nbytes = packed_bytes(math.prod(shape), fmt.bits)
                if t.dtype != torch.uint8 or tuple(t.shape) != (nbytes,):
                    raise misfit(f"packed codes {key} are {_dtype_name(t.dtype)} {list(t.shape)}, "
                                 f"expected uint8 [{nbytes}]")
                out[key] = unpack_codes(t, fmt.bits, code_range(fmt)[0], shape)
                continue
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise misfit(f"coded codes {key} are {_dtype_name(t.dtype)} {list(t.shape)}, expected a uint8 stream")
            try:
                out[key] = decode_codes(t, shape)
            except ValueError as exc:
                raise _damaged(name, f"coded codes {key}: {exc}") from None
    for key in manifest.get("bf16_tensors", []):
        if key not in layout.shapes or layout.shapes[key][1] != torch.float32:
            raise _damaged(name, f"bf16_tensors names {_show(key)[1:-1]}, which is not a float32 tensor of the model")
        if out[key].dtype != torch.bfloat16:
            raise misfit(f"{key} is {_dtype_name(out[key].dtype)}, listed as stored in bfloat16")
        out[key] = out[key].to(torch.float32)
    for key, (shape, dtype) in layout.shapes.items():
        t = out[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise misfit(f"{key} is {_dtype_name(t.dtype)} {list(t.shape)}, expected {_dtype_name(dtype)} {list(shape)}")
    for key, value in layout.fixed.items():
        if not torch.equal(out[key], value):
            raise misfit(f"index table {key} differs from the architecture's")
    return out


def _check_values(tensors: dict[str, torch.Tensor], plan: QuantPlan, model_name: str, name: str) -> None:
    """Finite floats; codes and zero points within their format's range; positive scales."""
    arch = _architecture(model_name)

    def invalid(key: str, detail: str) -> NnpqError:
        return NnpqError(f"{name} has invalid tensor values ({key}: {detail}); {FIX}")

    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise invalid(key, "NaN or infinite values")
        where = _layer_of(key, arch)
        if where is None:
            continue
        layer, buffer = where
        fmt = plan.format_for(*layer)
        if not fmt.is_integer:
            continue
        lo, hi = code_range(fmt)
        if buffer == "qweight" or (buffer == "zero" and not fmt.symmetric):
            codes = t.numpy()  # int8; numpy's single-threaded reductions beat torch's on small tensors
            found_lo, found_hi = int(codes.min()), int(codes.max())
            if found_lo < lo or found_hi > hi:
                what = "codes" if buffer == "qweight" else "zero points"
                raise invalid(key, f"{what} outside the {fmt.label()} range [{lo}, {hi}] "
                                   f"(found {found_lo if found_lo < lo else found_hi})")
        elif buffer == "zero" and bool(t.any()):
            raise invalid(key, f"zero points must be 0 for the symmetric {fmt.label()} (found {int(t.abs().max())})")
        elif buffer == "col_scale" and not plan.equalize_for(*layer) and not bool((t == 1).all()):
            raise invalid(key, f"must be 1 for a layer without input equalization (found {float(t.max()):g})")
        elif buffer in ("scale", "col_scale") and not bool((t > 0).all()):
            raise invalid(key, f"{'scales' if buffer == 'scale' else 'equalization factors'} must be positive "
                               f"(found {float(t.min()):g})")
        elif buffer == "act_scale" and plan.activation_for(*layer).mode == "static" and not bool((t > 0).all()):
            raise invalid(key, f"static activation scale must be positive (found {float(t.min()):g})")


def parse_artifact(data: bytes, name: str) -> Artifact:
    """Verify the bytes of an ``.nnpq`` file (``name`` is used in messages) and return its contents.

    Raises:
        NnpqError: truncated, altered, foreign, malformed or too new a file; one line naming ``name``.
    """
    header, body = _split_header(data, name)
    manifest = _read_manifest(header, name)
    plan = _check_manifest(manifest, name)
    tensors = _read_tensors(header, body, name)
    if tensors_sha256(tensors) != manifest["tensors_sha256"]:
        raise NnpqError(f"{name} is corrupt: its tensors do not match the checksum in its manifest; {FIX}")
    tensors = _unpack_and_check_layout(tensors, manifest, plan, name)
    _check_values(tensors, plan, manifest["source"]["model"], name)
    return Artifact(manifest=manifest, plan=plan, tensors=tensors)


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an ``.nnpq`` file (see `parse_artifact`).

    Raises:
        NnpqError: missing, unreadable, truncated, altered, foreign, malformed or too new a file.
    """
    path = Path(path)
    if not path.is_file():
        raise NnpqError(f"model file {path} not found; create one with 'nnpq quantize ani2x -o {path.name}'")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NnpqError(f"cannot read model file {path} ({exc.strerror or type(exc).__name__})") from None
    return parse_artifact(data, path.name)
