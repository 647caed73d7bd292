"""Guest layer: find the operating system on a disk and report its facts (``Inspection``)."""
