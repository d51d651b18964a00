"""What the server and its clients exchange byte for byte, importable by either without the engine."""
