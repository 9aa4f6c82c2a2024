"""Placeholder until this command family lands."""

COMMANDS: list = []
