"""Objective names -> their classes. Each class registers itself where it is implemented (`@register`); these
names are the choices of config.model.objective (its comment is tested to list exactly `names()`)."""

from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register(cls):
  if not cls.name or cls.name in REGISTRY:
    raise ValueError(f'objective {cls.__name__}: name {cls.name!r} is empty or registered twice')
  REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)
