"""The bundled demo: synthetic DICOM studies (``studies``), the CT phantom with known volumes
(``phantom``) and the installed app's self-test (``selftest``). May import engine.ai, engine.dicom
and the foundation modules.
"""
