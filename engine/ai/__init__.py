"""The AI pipeline: from a decoded series to a StudyResult (findings, severity, heatmaps).

``analysis`` runs one series end to end; ``validity`` is the gate that refuses what a model was
never meant to see; ``ct_quant``/``ct_verdict`` quantify CT in Hounsfield units; ``severity`` and
``severity_zones`` score X-ray severity; ``models/`` holds the architectures and the registry that
loads safetensors weights pinned by sha256; ``preprocess/`` prepares model inputs; ``explain/`` is
Grad-CAM; ``host`` runs all of it in one long-lived child process for the viewer (which then
never imports torch). May import engine.dicom and the foundation modules; never review, training
or Qt.
"""
