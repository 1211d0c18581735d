"""Interval estimates for the audit report, standard library only (no scipy in the annotate stage)."""
from __future__ import annotations

import math
from collections import Counter

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson's score interval for a binomial share (Wilson 1927); None for n = 0. Chosen over the
    Wald interval because audit samples per stratum are small and shares sit near 0 or 1, where Wald's
    interval leaves [0, 1] or collapses to a point."""
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired(both: int, first_only: int, second_only: int, neither: int,
                    z: float = Z95) -> tuple[float, tuple[float, float]] | None:
    """Difference of two shares measured on the same items (run 1 minus run 2) and its interval by
    Newcombe's method 10 (Statistics in Medicine 1998;17:2635, no continuity correction): the two
    Wilson intervals combined with the correlation phi of the paired 2x2 table. Paired because both
    runs are judged on the same figures, which makes the difference far more precise than two
    independent shares would. None for no pairs."""
    n = both + first_only + second_only + neither
    if n == 0:
        return None
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    (l1, u1), (l2, u2) = wilson(both + first_only, n, z), wilson(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = (both * neither - first_only * second_only) / math.sqrt(margins) if margins else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return difference, (max(-1.0, difference - delta), min(1.0, difference + epsilon))


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters' answers on the same items; None where it is undefined (no items,
    or chance agreement 1: both raters gave one and the same answer throughout)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(first[answer] * second[answer] for answer in first) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)
