"""Patients into train, validation and test splits: whole patients, never slices, reproducible by seed."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .errors import InputError


def _rounded_share(n: int, fraction: float) -> int:
    """Patients for a held-out split: round(n * fraction), at least one when the fraction is positive."""
    if fraction <= 0 or n == 0:
        return 0
    return max(1, int(math.floor(n * fraction + 0.5)))


def split_patients(patients: Iterable[str], val_fraction: float = 0.1, test_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, str]:
    """Assign every patient to 'train', 'val' or 'test' (shuffled with `seed`, independent of input order).

    Held-out splits get round(n * fraction) patients, at least one when their fraction is positive;
    the training split must keep at least one patient.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError(f"val fraction {val_fraction} and test fraction {test_fraction} must be in [0, 1) "
                         "and sum to less than 1")
    ids = sorted(set(patients))
    n = len(ids)
    n_test = _rounded_share(n, test_fraction)
    n_val = _rounded_share(n, val_fraction)
    if n - n_test - n_val < 1:
        raise InputError(f"{n} patient(s) are too few for a train/val/test split with fractions "
                         f"{val_fraction}/{test_fraction}; every split needs whole patients")
    order = np.random.default_rng(seed).permutation(n)
    out: dict[str, str] = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def split_held_out(patients: Iterable[str], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, str]:
    """Assign patients to 'val' or 'test' only, in the ratio val_fraction : test_fraction."""
    ids = sorted(set(patients))
    if not ids:
        return {}
    total = val_fraction + test_fraction
    if total <= 0:
        raise InputError("anomalous images need a validation or test split: set a val or test fraction above 0")
    n = len(ids)
    n_test = 0 if test_fraction <= 0 else n if val_fraction <= 0 else min(n, max(1, round(n * test_fraction / total)))
    order = np.random.default_rng(seed + 1).permutation(n)
    return {ids[i]: ("test" if rank < n_test else "val") for rank, i in enumerate(order)}
