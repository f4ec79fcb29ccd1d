"""Building models: datasets and patient-level splits, training, evaluation that writes the model
cards, the paper model zoo comparison, local validation on a site's own labelled data and the
torchxrayvision weight converter. The top room: may import every other engine room; nothing in
engine/ or viewer/ imports it (main.py runs it as commands).
"""
