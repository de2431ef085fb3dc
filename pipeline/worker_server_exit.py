"""Imported by the worker server alone (worker_server.PRELOAD), for its side effect: the server's interpreter, torch
loaded, would spend ~1 s in its final garbage collections after the batch's driver exits, and it holds the
driver's stdout and stderr, so whatever reads the batch's output through a pipe would wait for it."""
from edgesmith.pipeline.quick_exit import skip_final_collections

skip_final_collections()
