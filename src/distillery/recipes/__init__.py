"""Recipes: procedures built from several training runs (e.g. rounds of self-distillation)."""
