"""ChestView engine: DICOM I/O, pixel pipeline, models, inference, batch, export, networking.

Never imports Qt. The viewer talks to it through :mod:`engine.service`.
"""
__version__ = "0.1.0"
