"""Scoring of generations: the refusal rule and opening detector, exact match, lm-eval, ROUGE,
LLM judges, MT-Bench and secret leaks."""
