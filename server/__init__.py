"""Gorgon's command line and (later) HTTP server."""
