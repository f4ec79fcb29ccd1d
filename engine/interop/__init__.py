"""DICOM out and across the network: exports (SR TID 1500, Segmentation, Parametric Map,
Secondary Capture) and DIMSE networking (C-ECHO/FIND/MOVE/GET/STORE, the storage SCP).

May import engine.ai (result types and quantification constants), engine.dicom and the foundation
modules; never review, reading, training or Qt.
"""
