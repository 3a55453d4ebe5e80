"""Bridges from vmishell's sources and sessions to other memory-forensics tools."""
