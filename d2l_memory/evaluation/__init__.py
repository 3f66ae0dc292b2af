"""Evaluation: does an adapter answer like the document in the prompt does? (``d2l-memory eval``)"""
