"""The bench toolkit: what the entry points in bench/*.py are built from. Nothing here is run as a
script, and nothing here imports an entry point."""
