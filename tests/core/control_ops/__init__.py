"""Tests of the fleet package, module by module: wire, publisher, daemon, report and CLI."""
