"""The AI side of the window: the analysis worker, the findings panel, CT quantification and zone
overlays and the priors trend. May import viewer.view, viewer.pacs (export dialog) and the
top-level helpers; calls the engine only through engine.service and engine result types.
"""
