"""Checkers: they read traces (both sides' common schema) and judge them; they run nothing."""
