"""Reviewing whole folders: the batch engine on one machine (``batch``) or a Ray cluster
(``ray_batch``), both built from the same steps (``stages``); the resumable journal and the
CSV/JSON/HTML reports. May import engine.reading, engine.interop, engine.ai, engine.dicom and the
foundation modules; never training or Qt.
"""
