"""Unit conversions between ANI (Hartree, Angstrom), OpenMM (kJ/mol, nm) and ASE (eV, Angstrom).

Taken from TorchANI so that every engine converts exactly as the model's authors do.
"""

from torchani.units import HARTREE_TO_EV, HARTREE_TO_KCALPERMOL, HARTREE_TO_KJOULEPERMOL

HARTREE_TO_KJ_MOL: float = HARTREE_TO_KJOULEPERMOL
HARTREE_TO_KCAL_MOL: float = HARTREE_TO_KCALPERMOL
HARTREE_TO_EV_: float = HARTREE_TO_EV
NM_TO_ANGSTROM: float = 10.0
KCAL_TO_KJ: float = 4.184

__all__ = [
    "HARTREE_TO_KJ_MOL",
    "HARTREE_TO_KCAL_MOL",
    "HARTREE_TO_EV_",
    "NM_TO_ANGSTROM",
    "KCAL_TO_KJ",
]
