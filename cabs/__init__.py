"""Data: the host/guest OS matrix (matrix.json) and the catalog of IC cab names (catalog.json).

Installed as the package ``vhdtool.cabs``; read with importlib.resources.
"""
