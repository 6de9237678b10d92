"""Dramatiq workers: `dramatiq workers` sets up the Redis broker and loads the actors."""

from .broker import setup_broker

broker = setup_broker()

from . import actors  # noqa: E402  (actors need the broker set first)

__all__ = ["broker", "actors"]
