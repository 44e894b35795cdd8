"""The bot-independent core of admin-ops.

Kept import-light on purpose: ``core.ops_exec`` must load with only the standard library,
so nothing here may import discord or redis.
"""
