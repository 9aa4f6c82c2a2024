"""Where checkpoints come from: a folder or weights file, a Hugging Face Hub id
(:mod:`~deltaspec.loaders.sources.hub`), a live object — PeftModel, ``nn.Module``, state dict
(:mod:`~deltaspec.loaders.sources.live`) — and the base an adapter names
(:mod:`~deltaspec.loaders.sources.discovery`). Nothing here imports torch at import time except
:mod:`~deltaspec.loaders.sources.live`.
"""
