"""openmm-ml plugin: ``MLPotential('nnpq', model='ani2x-w8.nnpq')`` builds systems with nnpq models.

Registered under the ``openmmml.potentials`` entry-point group as ``nnpq``. openmm-ml's own
``createSystem``, ``createMixedSystem(..., interpolate=..., removeConstraints=...)`` and
``forceGroup`` call `NnpqPotentialImpl.addForces` exactly as they call the built-in ``ani2x``.
"""

from __future__ import annotations

from typing import Iterable

import openmm
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

from nnpq.errors import NnpqError


class NnpqPotentialImplFactory(MLPotentialImplFactory):
    """Creates `NnpqPotentialImpl` objects for openmm-ml."""

    def createImpl(self, name: str, **args) -> MLPotentialImpl:
        return NnpqPotentialImpl(**args)


class NnpqPotentialImpl(MLPotentialImpl):
    """An nnpq model (``.nnpq`` file or FP32 name) as an openmm-ml potential.

    Args:
        model: path to an ``.nnpq`` file, ``ani2x``/``ani1x``/``ani1ccx`` for FP32, or a loaded
            `nnpq.models.ANIPotential`.
        backend: ``auto`` (default), ``torchforce`` or ``pythonforce`` (see `nnpq.md.openmm`).
        mode: runtime mode of the quantized model, where the runtime has modes.
    """

    def __init__(self, model=None, backend: str = "auto", mode: str | None = None, **_unused) -> None:
        if model is None:
            raise NnpqError("MLPotential('nnpq') needs model=PATH to an .nnpq file (or an FP32 name such as 'ani2x')")
        self.model = model
        self.backend = backend
        self.mode = mode

    def addForces(self, topology: openmm.app.Topology, system: openmm.System, atoms: Iterable[int] | None,
                  forceGroup: int, backend: str | None = None, neighborlist: str | None = None,
                  device: str | None = None, positions=None, **args) -> None:
        """Add the ANI force for ``atoms`` (all when ``None``) to ``system`` in ``forceGroup``;
        ``positions`` (Å or an OpenMM quantity), when given, are checked against the model's domain.

        Periodic when the topology has a box or the system is periodic, as for openmm-ml's ANI.
        """
        from nnpq.md.openmm import make_force

        periodic = topology.getPeriodicBoxVectors() is not None or system.usesPeriodicBoundaryConditions()
        force = make_force(topology, self.model, atoms=atoms, backend=backend or self.backend,
                           neighborlist=neighborlist, periodic=periodic, device=device, mode=self.mode,
                           positions=positions)
        force.setForceGroup(forceGroup)
        system.addForce(force)

    def getMLLongRange(self) -> bool:
        """ANI is local (5.1 Å cutoff): mechanical embedding keeps MM long-range terms for the ML region."""
        return False
