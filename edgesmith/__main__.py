"""`python -m edgesmith`: the same command as the `edgesmith` script."""
from edgesmith.pipeline.cli import entry

entry()
