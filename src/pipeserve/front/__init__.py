"""The front process's side: admission and batching, worker supervision, the API dialects.

Nothing in this package imports torch, transformers or pipeserve.model: the front knows the
model process only by the name of its entry point (ipc.MODEL_ENTRY_POINT).
"""
