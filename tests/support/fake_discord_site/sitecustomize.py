"""Test-only: point discord.py at a local fake of Discord, through discord.py's own base URLs.

Put this directory on ``PYTHONPATH`` of a test's ``python bot.py``; Python imports
``sitecustomize`` at start-up, before ``bot.py`` runs, so the bot itself is unmodified:

- ``ADMIN_OPS_TEST_DISCORD_BASE``: the REST base (``discord.http.Route.BASE``), e.g.
  ``http://127.0.0.1:8080/api/v10``;
- ``ADMIN_OPS_TEST_DISCORD_GATEWAY``: the gateway (``DiscordWebSocket.DEFAULT_GATEWAY``), e.g.
  ``ws://127.0.0.1:8080/gateway``; discord.py connects there first, and again after a session is
  invalidated.

Without these variables it changes nothing.
"""

import os

_base = os.environ.get("ADMIN_OPS_TEST_DISCORD_BASE")
if _base:
    import discord.http

    discord.http.Route.BASE = _base

_gateway = os.environ.get("ADMIN_OPS_TEST_DISCORD_GATEWAY")
if _gateway:
    import discord.gateway
    import yarl

    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(_gateway)
