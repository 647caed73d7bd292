"""Staging: the integration services cab placed in the guest so that it installs at next boot, and its outcome.

``script`` is pure text (install.cmd and the boot hooks); the session that writes
them goes through the write engine (vhdtool.editor).
"""
