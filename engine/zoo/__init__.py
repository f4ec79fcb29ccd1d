"""The source papers' systems (issue 11) as registered architectures sharing one train/evaluate path."""
