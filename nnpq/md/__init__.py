"""Engines: OpenMM (`nnpq.md.openmm`), ASE (`nnpq.md.ase`) and the openmm-ml plugin."""
