"""The reading room's logic without Qt: hanging protocols (which series go where) and a patient's
priors and their AI trend. May import engine.interop (PACS queries for priors), engine.ai,
engine.dicom and the foundation modules; never review, training or Qt.
"""
