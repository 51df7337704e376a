"""Built-in molecular systems: ``get_system('water-box')``, ``list_systems()``.

Positions and boxes are in Angstrom; OpenMM topologies/positions in nm.
"""

from nnpq.systems.catalogue import MIXED_SYSTEMS, SYSTEMS, MolecularSystem, clear_cache, get_system, list_systems

__all__ = ["MIXED_SYSTEMS", "MolecularSystem", "SYSTEMS", "get_system", "list_systems", "clear_cache"]
