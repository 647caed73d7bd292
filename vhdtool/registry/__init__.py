"""Registry layer: Windows hives read in time linear in their size, brought up to date from their logs, and edited.

Reading: ``hive.Hive`` (on keys.py, records.py and cells.py). Writing: ``logreplay``
(replay a dirty hive's logs, retire them after a write) and ``hivex.edit_hive``
(edits through libhivex: values.py, editplan.py, libhivex.py, hivexchild.py,
editcheck.py). Import what you need from those modules; this package imports
nothing, so reading a hive never loads libhivex.
"""
