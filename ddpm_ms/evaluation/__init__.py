"""Offline sample quality: the dataset feature classifiers and the metrics computed in their space."""
