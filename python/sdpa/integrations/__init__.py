"""Bridges from other libraries to ``sdpa``, each in its own submodule and each optional.

``sdpa.integrations.transformers``
    Registers ``sdpa`` as an attention backend of Hugging Face transformers
    (``pip install "sdpa[transformers]"``, with PyTorch installed by the user).

Importing this package imports none of them: a submodule imports its library when it is used.
"""

__all__: list[str] = []
