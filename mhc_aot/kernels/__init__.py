"""Build outputs: cubins, PTX, metallib and manifest.json (written by build_tools, never committed)."""
