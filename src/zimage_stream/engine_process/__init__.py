"""The engine process: the model and the erase work in a child process the worker
supervises.

``supervisor`` is the worker's side (torch-free: start the process, feed it calls, kill
and restart it when it crashes or hangs); ``child`` is the process itself, which
composes the two rooms that compute, ``engine`` and ``erase``; ``entry`` is its
torch-free entry point, so the worker can name it without importing what it runs.
"""

from .supervisor import EngineDied, EngineProcess

__all__ = ["EngineDied", "EngineProcess"]
