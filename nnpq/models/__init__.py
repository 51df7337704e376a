"""FP32 ANI loading, the TorchANI-based reference runtime and the fused runtime, all behind `Potential`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from nnpq.errors import NnpqError
from nnpq.models.fp32 import MODEL_SPECS, load_fp32, model_spec
from nnpq.models.potential import ANIPotential, Potential, energy_and_forces

__all__ = ["ANIPotential", "MODEL_SPECS", "Potential", "energy_and_forces", "load_fp32", "load_potential",
           "load_quantized", "model_spec"]

# ``reference``: a quantized model run through TorchANI's per-member layers (plain torch, slow)
LOAD_MODES = ("exact", "fast", "reference")


def _check_load_mode(mode: str) -> str:
    if mode not in LOAD_MODES:
        raise NnpqError(f"unknown mode '{mode}'; use exact (weight-only, forces are the exact gradient) "
                        "or fast (INT8 activations on integer matrix products)")
    return mode


def load_quantized(path: str | os.PathLike, neighborlist: str = "all_pairs", mode: str = "exact",
                   backend: str = "torch") -> Potential:
    """The runtime of a ``.nnpq`` file, ready for engines (energies in Hartree).

    Args:
        mode: ``exact`` (default, the fused runtime, weight-only arithmetic), ``fast`` (INT8
            activations on ``torch._int_mm``; float16 activations on the Triton backend) or
            ``reference`` (TorchANI's per-member layers).
        backend: the fused runtime's ``torch`` or ``triton`` networks (`nnpq.runtime.resolve_backend`).
    """
    from nnpq.artifact import read_artifact

    _check_load_mode(mode)
    artifact = read_artifact(path)
    label = Path(path).name
    if mode != "reference":
        from nnpq.runtime.potential import runtime_from_tensors

        potential = runtime_from_tensors(artifact.model_name, artifact.plan, artifact.tensors, label, neighborlist,
                                         mode, backend)
    else:
        from nnpq.models.runtime import build_runtime

        try:
            model = build_runtime(artifact.model_name, artifact.plan, artifact.tensors, neighborlist)
        except RuntimeError as exc:
            # torch's first line is only "Error(s) in loading state_dict"; the next one says what is off
            detail = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2] or ["state dict mismatch"]
            raise NnpqError(f"{label} does not fit the {artifact.model_name} architecture "
                            f"({detail[0][:200]}); re-create it with 'nnpq quantize'") from None
        potential = ANIPotential(model, label, artifact.model_name)
    if "domain" in artifact.manifest:
        from nnpq.models.domain import Domain

        potential.domain = Domain.from_manifest(artifact.manifest["domain"])
    return potential


def load_potential(model: "str | os.PathLike | Potential", neighborlist: str = "all_pairs",
                   mode: str | None = None, device: str = "cpu", backend: str = "auto") -> Potential:
    """Resolve what a user passed as a model: a loaded potential, an ``.nnpq`` path, or an FP32 name.

    Args:
        mode: ``None`` (the default: ``exact`` for ``.nnpq`` files, TorchANI itself for FP32
            names), ``exact``, ``fast`` or ``reference``. An FP32 name with ``exact`` runs the
            fused runtime on the FP32 weights (labelled mode ``fp32``).
        device: torch device the potential is moved to.
        backend: the fused runtime's networks: ``auto`` (default: ``triton`` on CUDA where triton
            imports, else ``torch``), ``torch`` or ``triton`` (CPU tensors only under Triton's
            interpreter); see `nnpq.runtime.resolve_backend`. TorchANI potentials ignore it.
    """
    if isinstance(model, Potential):
        return model
    if mode is not None:
        _check_load_mode(mode)
    from nnpq.runtime.potential import resolve_backend

    backend = resolve_backend(backend, device)
    text = os.fspath(model)
    is_name = text.lower().replace("-", "").replace("_", "") in MODEL_SPECS
    if Path(text).is_file():  # an existing file always wins over a model name
        if is_name:
            warnings.warn(f"'{text}' is both an existing file and the name of an FP32 model; loading the file "
                          f"{Path(text).resolve()} as an .nnpq model (rename or move it to use the FP32 model)",
                          stacklevel=2)
        return load_quantized(text, neighborlist, mode or "exact", backend).to(device)
    if not is_name and (Path(text).suffix == ".nnpq" or Path(text).exists() or os.sep in text):
        return load_quantized(text, neighborlist, mode or "exact", backend).to(device)
    spec = model_spec(text)  # the one-line 'unknown model' error for anything else
    fp32 = load_fp32(spec.name, neighborlist)
    if mode is None or mode == "reference":
        return ANIPotential(fp32, spec.name, spec.name, "fp32").to(device)
    from nnpq.runtime.potential import runtime_from_fp32

    return runtime_from_fp32(fp32, spec.name, mode, backend).to(device)
