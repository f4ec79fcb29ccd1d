"""Patient-level split checks: no patient may appear in two splits (a leak inflates every metric)."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable


class SplitLeakError(ValueError):
    """Raised when a patient id occurs in more than one split."""


def patients_by_split(rows: Iterable[dict[str, str]], patient_key: str = "patient_id",
                      split_key: str = "split") -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        out[r[split_key]].add(r[patient_key])
    return dict(out)


def leaked_patients(rows: Iterable[dict[str, str]], patient_key: str = "patient_id",
                    split_key: str = "split") -> dict[str, set[str]]:
    """patient -> the set of splits it occurs in, for every patient in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        seen[r[patient_key]].add(r[split_key])
    return {p: s for p, s in seen.items() if len(s) > 1}


def check_no_patient_leak(rows: Iterable[dict[str, str]], patient_key: str = "patient_id",
                          split_key: str = "split") -> None:
    """Raise SplitLeakError naming how many patients leak (ids are not logged: they identify patients)."""
    bad = leaked_patients(rows, patient_key, split_key)
    if bad:
        raise SplitLeakError(f"{len(bad)} patient(s) occur in more than one split; fix the split column "
                             "(splits must be patient-level)")


def grouped_splits(groups: list[str], n_splits: int, test_frac: float, seed: int = 0):
    """Yield (train_idx, test_idx) for ``n_splits`` random patient-grouped splits (Cohen et al. style
    repeated splits): whole patients go to one side, about ``test_frac`` of patients to the test side."""
    import numpy as np

    uniq = sorted(set(groups))
    rs = np.random.RandomState(seed)
    g = np.asarray(groups)
    for _ in range(n_splits):
        perm = rs.permutation(len(uniq))
        n_test = max(1, int(round(test_frac * len(uniq))))
        test_p = {uniq[i] for i in perm[:n_test]}
        is_test = np.array([x in test_p for x in g])
        yield np.nonzero(~is_test)[0], np.nonzero(is_test)[0]
