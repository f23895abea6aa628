"""The model process's side: the task registry, the pipeline adapters, loading, media decoding.

Only the model process imports this package (through pipeserve.model_proc); it is where torch
and transformers are imported. The front never imports it.
"""
