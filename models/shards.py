"""Rows a shuffled shard owns, when a salted co-group copied some of them (transforms/frames.py).

A hot key's shared rows (a vehicle's fitment) are copied to every slice of the key, so
each slice can be scored alone. The copies sit after a group's own rows and are listed
again under ``name + COPIES``; anything that counts rows counts ``owned(groups, name)``.
"""
from __future__ import annotations

from typing import Mapping

import pandas as pd

COPIES = "\x00copies"   # suffix of the group holding a hot key's copied rows


def owned(groups: Mapping[str, pd.DataFrame], name: str) -> pd.DataFrame:
    """The rows of ``groups[name]`` this shard owns, without hot keys' extra copies."""
    frame = groups[name]
    copies = groups.get(name + COPIES)
    if copies is None or not len(copies):
        return frame
    return frame.iloc[:len(frame) - len(copies)]
