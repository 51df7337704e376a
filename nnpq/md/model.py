"""What every engine does with a user's model argument: resolve it to an `Potential`."""

from __future__ import annotations

import inspect
import os

from nnpq.errors import NnpqError
from nnpq.models import Potential, load_potential


def resolve_potential(model: str | os.PathLike | Potential, neighborlist: str,
                      mode: str | None = None) -> Potential:
    """``load_potential(model, neighborlist)``, passing the runtime ``mode`` where the runtime has modes.

    Args:
        model: FP32 name (``ani2x``), path to an ``.nnpq`` file, or a loaded potential (returned as is).
        neighborlist: ``all_pairs`` or ``cell_list``.
        mode: runtime mode (e.g. ``exact`` or ``fast``); ``None`` keeps the runtime's default.
    """
    if mode is None:
        return load_potential(model, neighborlist)
    if "mode" not in inspect.signature(load_potential).parameters:
        raise NnpqError(f"this nnpq runtime has no modes; drop mode={mode!r} (or --mode)")
    return load_potential(model, neighborlist, mode=mode)
