"""Built-in molecular systems: ``get_system('water-box')``, ``list_systems()``.

Positions and boxes are in Angstrom; OpenMM topologies/positions in nm.
"""

from nnpq.systems.catalogue import SYSTEMS, MolecularSystem, clear_cache, get_system, list_systems

__all__ = ["MolecularSystem", "SYSTEMS", "get_system", "list_systems", "clear_cache"]
