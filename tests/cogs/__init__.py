"""Tests of the admin-ops cog in dpytest."""
