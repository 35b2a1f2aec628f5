"""Screening: the inference chain hologram -> refocus -> segment -> detect -> classify, and its evaluation."""
