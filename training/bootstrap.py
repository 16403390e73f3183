"""Block bootstrap over frames: intervals for figures computed from frames of one drive.

Consecutive frames of a drive are alike, so resampling single frames would treat 21 frames as 21
independent draws and give intervals that are too narrow. The frames (in time order) are cut into
blocks of ``block`` consecutive frames (the last may be shorter); a replicate draws as many blocks
as there are, with replacement, and counts each frame as often as its block was drawn (Carlstein's
non-overlapping block bootstrap). Replicates are given as counts per frame, which is what
:meth:`uncertain_seg_training.frame_stats.FrameStatistics.pooled` takes, so every metric of a
replicate is computed from summed counts exactly as the metric itself.
"""
import numpy as np


def block_bootstrap_weights(frames: int, block: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, frames) int64: how often each frame is counted in each replicate."""
    if frames < 1 or block < 1 or replicates < 1:
        raise ValueError(f"frames, block and replicates must be positive, got {frames}, {block}, {replicates}")
    block_of = np.arange(frames) // block
    blocks = int(block_of[-1]) + 1
    drawn = np.random.default_rng(seed).integers(0, blocks, size=(replicates, blocks))
    counts = np.zeros((replicates, blocks), np.int64)
    np.add.at(counts, (np.repeat(np.arange(replicates), blocks), drawn.reshape(-1)), 1)
    return counts[:, block_of]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (NaN replicates ignored)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
