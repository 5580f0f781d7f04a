"""Maths on tensors (torch and numpy only, no files): noise schedules, samplers and inversion, losses,
selection rules, EMA and metric maths. Imports nothing else from pgraft but its errors."""
