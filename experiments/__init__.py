"""The experiment files this project ships, installed as package data (``launcher.experiments``).

Address them by name (``launch pretrain mae --experiment pretrain/mae_vit_base``) or copy one
and pass its path; ``launch experiments`` lists them. This file only makes the folder a package.
"""
