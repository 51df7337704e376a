"""FP32 ANI loading and the quantized runtime, both behind `ANIPotential`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from nnpq.errors import NnpqError
from nnpq.models.fp32 import MODEL_SPECS, load_fp32, model_spec
from nnpq.models.potential import ANIPotential, energy_and_forces

__all__ = ["ANIPotential", "MODEL_SPECS", "energy_and_forces", "load_fp32", "load_potential",
           "load_quantized", "model_spec"]


def load_quantized(path: str | os.PathLike, neighborlist: str = "all_pairs") -> ANIPotential:
    """The runtime of a ``.nnpq`` file, ready for engines (energies in Hartree)."""
    from nnpq.artifact import read_artifact
    from nnpq.models.runtime import build_runtime

    artifact = read_artifact(path)
    try:
        model = build_runtime(artifact.model_name, artifact.plan, artifact.tensors, neighborlist)
    except RuntimeError as exc:
        # torch's first line is only "Error(s) in loading state_dict"; the next one says what is off
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()][1:2] or ["state dict mismatch"]
        raise NnpqError(f"{Path(path).name} does not fit the {artifact.model_name} architecture "
                        f"({detail[0][:200]}); re-create it with 'nnpq quantize'") from None
    potential = ANIPotential(model, Path(path).name, artifact.model_name)
    if "domain" in artifact.manifest:
        from nnpq.models.domain import Domain

        potential.domain = Domain.from_manifest(artifact.manifest["domain"])
    return potential


def load_potential(model: "str | os.PathLike | ANIPotential", neighborlist: str = "all_pairs") -> ANIPotential:
    """Resolve what a user passed as a model: a loaded potential, an ``.nnpq`` path, or an FP32 name."""
    if isinstance(model, ANIPotential):
        return model
    text = os.fspath(model)
    is_name = text.lower().replace("-", "").replace("_", "") in MODEL_SPECS
    if Path(text).is_file():  # an existing file always wins over a model name
        if is_name:
            warnings.warn(f"'{text}' is both an existing file and the name of an FP32 model; loading the file "
                          f"{Path(text).resolve()} as an .nnpq model (rename or move it to use the FP32 model)",
                          stacklevel=2)
        return load_quantized(text, neighborlist)
    if not is_name and (Path(text).suffix == ".nnpq" or Path(text).exists() or os.sep in text):
        return load_quantized(text, neighborlist)
    spec = model_spec(text)  # the one-line 'unknown model' error for anything else
    return ANIPotential(load_fp32(spec.name, neighborlist), spec.name, spec.name)
