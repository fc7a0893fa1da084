"""The cluster profiles this project ships, installed as package data (``launcher.clusters``).

Profiles of your own go in ``$LAUNCH_CLUSTERS`` or ``~/.config/launch/clusters/`` (``launch
cluster init NAME`` writes one there). This file only makes the folder a package.
"""
