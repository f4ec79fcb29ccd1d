"""Reading DICOM: files and folders to studies, series, pixels and volumes (PS3.3, PS3.5, PS3.10).

``index`` walks folders/DICOMDIR/ZIP into patient-study-series records, ``pixels`` reads headers and
decodes frames to modality values, ``budget`` refuses what the header, a ZIP/deflate stream or a
codestream declares beyond the memory budget, ``display`` applies the VOI LUT for display and the AI
(``attributes``: tolerant header reads), ``volume`` stacks CT slices in patient coordinates,
``overlays`` reads 60xx overlay planes and ``safe_decode`` runs every decode of untrusted bytes in a
sandboxed child process. May import only the foundation modules (engine.errors, engine.paths,
engine.logscrub, engine.metrics, engine.results); never torch, never Qt.
"""
