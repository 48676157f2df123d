"""Prompt datasets and the built-in testbeds (the arithmetic demo, the planted-rock task, the realistic padded pair)."""
