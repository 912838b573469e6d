"""sparsetrain inside other training loops: :mod:`sparsetrain.integrations.lightning` (``pip install
'sparsetrain[lightning]'``). Each integration is a thin layer over the public API (``sparsify_``, ``handle.step``,
``handle.state_dict``, ``handle.measuring``, ``handle.densities``) and imports its framework only when imported."""

__all__: list[str] = []
