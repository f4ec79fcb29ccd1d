"""DICOM I/O: index (headers only), pixels (decode + LUTs), volume (CT series), export, network."""
