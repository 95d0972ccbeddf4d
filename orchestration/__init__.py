"""Therapy orchestration: protocols, plan state and the decisions that advance it."""
