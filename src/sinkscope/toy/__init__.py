"""Toy problems where attention sinks emerge and can be studied exactly (seed 003 §7)."""
