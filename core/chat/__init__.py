"""The cog's Discord-facing parts: replies, checks, the invocation pipeline, markers, audit.

``cogs/admin_ops.py`` composes these; they live here rather than in ``cogs/`` because bots
commonly load every ``cogs/*.py`` as an extension.
"""
