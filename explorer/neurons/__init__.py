"""Neurons over a corpus: the resumable index of top and random examples, and descriptions."""
