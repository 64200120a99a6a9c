"""Distillation recipes: which networks train, which are frozen, their losses and update cycle."""
