"""Hypernetworks as A1111 users have them (``models/hypernetworks``, ``<hypernet:NAME:MULT>``): small MLPs that
change the context the UNet's attention layers read as keys and values. ``layout`` (the settings and the module
layout they imply), ``formats`` (reading and writing A1111's pickle), ``network`` (applying them beside the
weights), ``library`` (the folder, names and hashes)."""
