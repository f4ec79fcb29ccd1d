"""The source papers' systems as registered architectures sharing one train/evaluate path."""
