"""What a shard manifest (``manifest.json``, written by ``leanmim shard``) must say for training to read it right:
its splits and shard names and counts, channels, image size, classes and per-channel statistics."""

from __future__ import annotations

import math
import os
from typing import Any


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite_numbers(values: Any, length: int) -> bool:
    return isinstance(values, list) and len(values) == length and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong in a manifest that would make training read wrong (None when nothing): its splits and shard
    names and counts, channels, image size, classes, and per-channel statistics (a std of 0 would divide by 0)."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "'splits' must map split names to their shards"
    for split, entry in splits.items():
        if split not in ("train", "test") or not isinstance(entry, dict):
            return f"split '{split}' is not one of train, test, or is not an object"
        shards = entry.get("shards")
        if not isinstance(shards, list) or not shards:
            return f"split '{split}' lists no shards"
        for shard in shards:
            name = shard.get("name") if isinstance(shard, dict) else None
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                return f"split '{split}' lists a shard name {name!r} that is not a file name in the directory"
            if not _count(shard.get("count")):
                return f"shard '{name}' has count {shard.get('count')!r}, not a whole number >= 0"
        if not _count(entry.get("count")) or entry["count"] != sum(shard["count"] for shard in shards):
            return f"split '{split}' count {entry.get('count')!r} is not the sum of its shards' counts"
    if manifest.get("channels") not in (None, 1, 3):
        return f"channels {manifest.get('channels')!r} is not 1 or 3"
    size = manifest.get("img_size")
    if size is not None and not (_count(size) and size > 0):
        return f"img_size {size!r} is not a positive whole number"
    classes = manifest.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes or
                                not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes)):
        return "'classes' must be a list of distinct, non-empty class names"
    stats = manifest.get("stats", {})
    if not isinstance(stats, dict):
        return "'stats' must map channel counts to mean and std"
    for chans, entry in stats.items():
        if chans not in ("1", "3") or not isinstance(entry, dict):
            return f"stats for {chans!r} channels: channel counts are '1' and '3'"
        mean, std = entry.get("mean"), entry.get("std")
        if not _finite_numbers(mean, int(chans)) or not _finite_numbers(std, int(chans)):
            return f"stats for {chans} channel(s) need {chans} finite mean and std values"
        if min(std) <= 0:
            return f"stats for {chans} channel(s) have std {std}: a std of 0 or less would divide by zero"
    return None
