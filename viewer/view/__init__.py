"""Looking at images: the image view (window/level, zoom, measurements, corner text), MPR, the
viewport layouts and the heatmap overlay. Imports no other viewer room except viewer.qt_workers
and viewer.style.
"""
