"""Data: the host/guest OS matrix of Hyper-V integration services (matrix.json).

Installed as the package ``vhdtool.cabs``; read with importlib.resources.
"""
