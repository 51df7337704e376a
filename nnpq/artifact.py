"""The quantized model file (``.nnpq``): one safetensors file, manifest in its metadata.

Tensors are the quantized model's state dict (int8 codes, float32 scales, the FP32
rest); the JSON manifest names the source model and its sha256, the plan, the nnpq and
format versions, and a sha256 over all tensors, so truncated, altered or foreign files
are rejected with one clear message. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import nnpq
from nnpq.atomic_io import write_bytes_atomic
from nnpq.errors import NnpqError
from nnpq.models.fp32 import n_layers
from nnpq.spec.packing import pack_codes, unpack_codes
from nnpq.spec.plan import QuantPlan
from nnpq.spec.formats import code_range

FORMAT_NAME = "nnpq"
FORMAT_VERSION = 1
MANIFEST_KEY = "nnpq_manifest"


@dataclass
class Artifact:
    """A quantized model as stored: its manifest, plan and tensors."""

    manifest: dict[str, Any]
    plan: QuantPlan
    tensors: dict[str, torch.Tensor]

    @property
    def model_name(self) -> str:
        return self.manifest["source"]["model"]


_LAYER_KEY = re.compile(r"members\.(\d+)\.atomics\.(\w+)\.(?:layers\.(\d+)|final_layer)\.qweight$")


def _narrow_codes(tensors: dict[str, torch.Tensor], plan: QuantPlan, n_hidden: int):
    """``(key, bits, lowest)`` of every code tensor whose format is narrower than 8 bits."""
    for key in tensors:
        match = _LAYER_KEY.search(key)
        if match is None:
            continue
        member, element, layer = int(match[1]), match[2], match[3]
        fmt = plan.format_for(member, element, n_hidden if layer is None else int(layer))
        if fmt.is_integer and fmt.bits < 8:
            yield key, fmt.bits, code_range(fmt)[0]


def _hidden_layers(tensors: dict[str, torch.Tensor]) -> int:
    return 1 + max((int(m[3]) for k in tensors if (m := _LAYER_KEY.search(k)) and m[3] is not None), default=-1)


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
    shapes = {}
    for key, bits, lowest in list(_narrow_codes(tensors, plan, n_hidden)):
        shapes[key] = list(tensors[key].shape)
        tensors[key] = pack_codes(tensors[key], bits, lowest)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "nnpq_version": nnpq.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "plan": plan.to_dict(),
        "tensors_sha256": tensors_sha256(tensors),
        "packed_shapes": shapes,
        "metrics": metrics or {},
    }
    if domain is not None:
        manifest["domain"] = domain
    data = st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
    return write_bytes_atomic(path, data)


def _read_header(data: bytes, name: str) -> dict[str, Any]:
    bad = f"{name} is not a valid nnpq model file (truncated, corrupt or not safetensors); re-create it with 'nnpq quantize'"
    if len(data) < 8:
        raise NnpqError(bad)
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise NnpqError(bad)
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NnpqError(bad) from None
    if not isinstance(header, dict):
        raise NnpqError(bad)
    return header


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and verify an ``.nnpq`` file.

    Raises:
        NnpqError: missing, truncated, altered, foreign or too new a file.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise NnpqError(f"model file {path} not found; create one with 'nnpq quantize ani2x -o {name}'")
    data = path.read_bytes()
    header = _read_header(data, name)
    meta = header.get("__metadata__") or {}
    if MANIFEST_KEY not in meta:
        raise NnpqError(f"{name} is a safetensors file but not an nnpq model (no nnpq manifest); "
                        "create one with 'nnpq quantize'")
    damaged = f"{name} has a damaged nnpq manifest"
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
        if manifest["format"] != FORMAT_NAME:
            raise KeyError("format")
        version = int(manifest["format_version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise NnpqError(f"{damaged} (field {exc}); re-create it with 'nnpq quantize'") from None
    # the version decides how the rest is laid out, so it is checked before anything else is read
    if version > FORMAT_VERSION:
        raise NnpqError(f"{name} uses nnpq format {version}, newer than this nnpq "
                        f"({nnpq.__version__}, format {FORMAT_VERSION}); upgrade nnpq")
    try:
        plan = QuantPlan.from_dict(manifest["plan"])
        expected = manifest["tensors_sha256"]
        manifest["source"]["model"]
    except (KeyError, TypeError, NnpqError) as exc:
        raise NnpqError(f"{damaged} ({exc}); re-create it with 'nnpq quantize'") from None
    try:
        tensors = st_load(data)
    except Exception:
        raise NnpqError(f"{name} is not a valid nnpq model file (truncated or corrupt tensor data); "
                        "re-create it with 'nnpq quantize'") from None
    if tensors_sha256(tensors) != expected:
        raise NnpqError(f"{name} is corrupt: its tensors do not match the checksum in its manifest; "
                        "re-create it with 'nnpq quantize'")
    shapes = manifest.get("packed_shapes", {})
    for key, bits, lowest in list(_narrow_codes(tensors, plan, _hidden_layers(tensors))):
        if key not in shapes:
            raise NnpqError(f"{damaged} (no shape for packed codes {key}); re-create it with 'nnpq quantize'")
        tensors[key] = unpack_codes(tensors[key], bits, lowest, tuple(shapes[key]))
    return Artifact(manifest=manifest, plan=plan, tensors=tensors)
