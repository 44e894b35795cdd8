"""Helpers the tests share: real processes, git repositories, Redis and a Discord harness."""

from pathlib import Path

#: The project checkout.
ROOT = Path(__file__).resolve().parents[2]
