"""PACS and exports: query/retrieve and the storage listener, and the DICOM export dialog.
May import the top-level helpers only (viewer.qt_workers, viewer.style, viewer.settings_store).
"""
