"""Finding studies: the study browser, worklist, thumbnails and DICOM tag browser. May import
viewer.view (annotation text helpers) and the top-level helpers.
"""
