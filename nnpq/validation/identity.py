"""What a validated model is: its file, mode and tensor checksum, and how a task loads it.

The checksum goes into every checkpoint and result key, so a model re-quantized to the
same file name never resumes or reuses the old model's trajectories.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from nnpq.errors import NnpqError

FP32_KEY = "fp32"


@dataclass(frozen=True)
class ModelRef:
    """A model as a campaign task sees it (plain data: it travels to Dask workers).

    Attributes:
        key: short name for folders and report keys (``fp32``, ``ani2x-w8-exact``).
        label: name shown in reports (``ani2x-w8.nnpq (exact)``).
        source: FP32 name or ``.nnpq`` path, as `nnpq.models.load_potential` takes it.
        mode: runtime mode (``exact``/``fast``), ``fp32`` for the reference.
        sha256: the artifact manifest's ``tensors_sha256``, or the FP32 weights file's sha256.
        reference: the FP32 model it was made from (itself for the reference).
    """

    key: str
    label: str
    source: str
    mode: str
    sha256: str
    reference: str

    @property
    def is_reference(self) -> bool:
        return self.key == FP32_KEY


def runtime_modes() -> tuple[str, ...]:
    """The runtime modes a quantized model can be validated in."""
    from nnpq.runtime.potential import MODES

    return MODES


def _fp32_sha256(name: str) -> str:
    from nnpq.models.fp32 import _missing_weights_message, model_spec, weights_path

    path = weights_path(name)  # looked up on every call: TORCHANI_DATA_DIR may have changed
    if not path.is_file():  # the one message every command gives for missing weights
        raise NnpqError(_missing_weights_message(model_spec(name), path))
    return _file_sha256(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, mtime_ns: int) -> str:
    from nnpq.models.fp32 import file_sha256

    return file_sha256(Path(path))


def reference_ref(name: str) -> ModelRef:
    """The FP32 reference ``name`` (``ani2x``)."""
    from nnpq.models import model_spec

    spec = model_spec(name)
    return ModelRef(FP32_KEY, f"{spec.name} (FP32)", spec.name, "fp32", _fp32_sha256(spec.name), spec.name)


def resolve_models(models: list[str], modes: tuple[str, ...] = ("exact",)) -> list[ModelRef]:
    """The reference first, then each ``.nnpq`` file once per mode.

    Raises:
        NnpqError: a missing or damaged file, a mode the runtime lacks, or models made from
            different FP32 references (validate those in separate runs).
    """
    from nnpq.artifact import read_artifact
    from nnpq.models import MODEL_SPECS

    offered = runtime_modes()
    for mode in modes:
        if mode not in offered:
            raise NnpqError(f"mode '{mode}' is not offered by this nnpq runtime; choose from {', '.join(offered)}")
    refs: list[ModelRef] = []
    references: set[str] = set()
    for text in models:
        if text.lower().replace("-", "").replace("_", "") in MODEL_SPECS:
            references.add(reference_ref(text).reference)  # an FP32 name is the reference itself
            continue
        artifact = read_artifact(text)
        references.add(artifact.model_name)
        for mode in modes:
            stem = Path(text).name.removesuffix(".nnpq")
            refs.append(ModelRef(f"{stem}-{mode}", f"{Path(text).name} ({mode})", os.fspath(Path(text).resolve()),
                                 mode, artifact.manifest["tensors_sha256"], artifact.model_name))
    if not refs:
        raise NnpqError("no model to validate; pass .nnpq files (the FP32 reference is added by itself)")
    if len(references) > 1:
        raise NnpqError(f"the models come from different FP32 references ({', '.join(sorted(references))}); "
                        "validate each reference's models in a separate run")
    keys = [r.key for r in refs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise NnpqError(f"two models share the name {duplicates[0]}; give the files different names")
    return [reference_ref(references.pop())] + refs


@functools.lru_cache(maxsize=8)
def load(ref: ModelRef, neighborlist: str):
    """The potential of ``ref`` (cached per process: Dask workers load each model once).

    Raises:
        NnpqError: the file no longer holds the tensors ``ref`` was resolved with.
    """
    from nnpq.artifact import read_artifact
    from nnpq.models import load_potential

    if not ref.is_reference and read_artifact(ref.source).manifest["tensors_sha256"] != ref.sha256:
        raise NnpqError(f"{ref.source} changed while it was being validated; rerun the validation")
    # the FP32 reference runs on the same fused runtime (its exact mode on the published weights), so
    # a quantized model's distances come from its weights and mode, not from another code path
    return load_potential(ref.source, neighborlist, mode="exact" if ref.is_reference else ref.mode)
