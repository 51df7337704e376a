"""FP32 ANI models through TorchANI: the reference every quantized model is measured against.

`load_fp32` goes through `torchani.models` (the real loader, TorchANI's cache under
TORCHANI_DATA_DIR); `assemble_architecture` builds the same network with untrained
weights, which a quantized artifact then fills, so a quantized model needs no FP32 file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchani
from torchani.arch import ANI, Assembler
from torchani.utils import SYMBOLS_1X, SYMBOLS_2X

from nnpq.errors import NnpqError

NEIGHBORLISTS = ("all_pairs", "cell_list")


@dataclass(frozen=True)
class ModelSpec:
    """How TorchANI assembles one published ANI ensemble."""

    name: str
    title: str
    loader: Callable[..., ANI]
    state_dict_file: str
    symbols: tuple[str, ...]
    aev: str
    self_energies: str


MODEL_SPECS: dict[str, ModelSpec] = {
    "ani2x": ModelSpec("ani2x", "ANI-2x", torchani.models.ANI2x, "ani2x_state_dict.pt",
                       tuple(SYMBOLS_2X), "ani2x", "wb97x-631gd"),
    "ani1x": ModelSpec("ani1x", "ANI-1x", torchani.models.ANI1x, "ani1x_state_dict.pt",
                       tuple(SYMBOLS_1X), "ani1x", "wb97x-631gd"),
    "ani1ccx": ModelSpec("ani1ccx", "ANI-1ccx", torchani.models.ANI1ccx, "ani1ccx_state_dict.pt",
                         tuple(SYMBOLS_1X), "ani1x", "ccsd(t)star-cbs"),
}


def model_spec(name: str) -> ModelSpec:
    """The spec of a published model by its nnpq name (``ani2x``, ``ani1x``, ``ani1ccx``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in MODEL_SPECS:
        raise NnpqError(
            f"unknown model '{name}'; supported: {', '.join(MODEL_SPECS)} "
            "(or a quantized .nnpq file)"
        )
    return MODEL_SPECS[key]


def _check_neighborlist(neighborlist: str) -> str:
    if neighborlist not in NEIGHBORLISTS:
        raise NnpqError(f"unknown neighbour list '{neighborlist}'; use one of {', '.join(NEIGHBORLISTS)}")
    return neighborlist


def weights_path(name: str) -> Path:
    """Where TorchANI's cache keeps the state dict of model ``name``."""
    return torchani.paths.data_dir() / "StateDicts" / model_spec(name).state_dict_file


def _missing_weights_message(spec: ModelSpec, path: Path) -> str:
    where = os.environ.get("TORCHANI_DATA_DIR") or "unset"
    return (
        f"{spec.title} weights not found at {path} (TORCHANI_DATA_DIR={where}); point "
        f"TORCHANI_DATA_DIR at a folder holding StateDicts/{spec.state_dict_file}, "
        "or allow one download from the model hub"
    )


def load_fp32(name: str = "ani2x", neighborlist: str = "all_pairs") -> ANI:
    """Load a published FP32 ANI ensemble through ``torchani.models``.

    Args:
        name: ``ani2x``, ``ani1x`` or ``ani1ccx``.
        neighborlist: ``all_pairs`` or ``cell_list`` (faster for periodic boxes).

    Raises:
        NnpqError: unknown name, or weights not in TORCHANI_DATA_DIR while offline.
    """
    spec = model_spec(name)
    _check_neighborlist(neighborlist)
    path = weights_path(name)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not path.is_file() and offline:
        raise NnpqError(_missing_weights_message(spec, path))
    try:
        model = spec.loader(neighborlist=neighborlist)
    except Exception as exc:  # TorchANI falls through hub, mirror and URL: any failure means no weights
        raise NnpqError(_missing_weights_message(spec, path) + f" ({type(exc).__name__})") from None
    return model.eval()


def assemble_architecture(name: str, neighborlist: str = "all_pairs") -> ANI:
    """The network of model ``name`` exactly as ``torchani.models`` builds it, weights untrained."""
    spec = model_spec(name)
    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(spec.symbols)
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial=spec.aev, angular=spec.aev, strategy="pyaev")
    asm.set_atomic_networks(ctor=spec.aev)
    asm.set_neighborlist(_check_neighborlist(neighborlist))
    asm.set_gsaes_as_self_energies(spec.self_energies)
    model = asm.assemble(8)
    model.requires_grad_(False)
    return model.eval()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def n_layers(model: ANI) -> int:
    """Linear layers per element network, the final width-1 one included (4 for ANI)."""
    return len(model.neural_networks.members[0].atomics[model.symbols[0]].layers) + 1


def hidden_and_final_layers(model: ANI) -> dict[tuple[int, str, int], torch.nn.Linear]:
    """Every Linear layer of every element network of every member.

    Keys are ``(member, element, layer)``; layer ``len(hidden)`` is the width-1 final layer.
    """
    layers: dict[tuple[int, str, int], torch.nn.Linear] = {}
    for m, member in enumerate(model.neural_networks.members):
        for element, net in member.atomics.items():
            for i, layer in enumerate(net.layers):
                layers[(m, element, i)] = layer
            layers[(m, element, len(net.layers))] = net.final_layer
    return layers
