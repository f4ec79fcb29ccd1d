"""ChestView engine, in rooms by job (docs/ARCHITECTURE.md); dependencies flow one way:

- foundation modules here: ``errors``, ``paths``, ``logscrub``, ``metrics``, ``results`` (import nothing else);
- ``dicom/`` reading DICOM; ``ai/`` the models and analysis (imports dicom);
- ``interop/`` exports and networking (imports ai, dicom); ``reading/`` hanging and priors;
- ``review/`` batch and Ray; ``demo/`` demo data and self-test; ``training/`` building models (top);
- ``service`` the facade the viewer calls.

Never imports Qt (tests/test_layering.py).
"""
__version__ = "0.1.0"
