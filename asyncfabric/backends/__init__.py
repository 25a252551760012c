"""The backends shipped with asyncfabric, one package each, each a plugin.

They are found through the entry-point group ``asyncfabric.backends`` (see
``asyncfabric.transport.registry``); nothing imports this package to find them.
A backend imports ``asyncfabric.transport`` (the contract) and never the engine.
"""
