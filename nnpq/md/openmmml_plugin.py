"""openmm-ml plugin: ``MLPotential('nnpq', model='ani2x-w8.nnpq')`` builds systems with nnpq models.

Registered under the ``openmmml.potentials`` entry-point group as ``nnpq``.
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
        model: path to an ``.nnpq`` file, or ``ani2x``/``ani1x``/``ani1ccx`` for FP32.
    """

    def __init__(self, model: str | None = None, **_unused) -> None:
        if model is None:
            raise NnpqError("MLPotential('nnpq') needs model=PATH to an .nnpq file (or an FP32 name such as 'ani2x')")
        self.model = model

    def addForces(self, topology: openmm.app.Topology, system: openmm.System, atoms: Iterable[int] | None,
                  forceGroup: int, backend: str = "torchforce", neighborlist: str | None = None, **args) -> None:
        from nnpq.md.openmm import make_force

        force = make_force(topology, self.model, atoms=atoms, backend=backend, neighborlist=neighborlist)
        force.setForceGroup(forceGroup)
        system.addForce(force)
