"""Patient-level split checks: the given splits never leak a patient; the checker catches leaks."""
from __future__ import annotations

import numpy as np
import pytest

from engine.training.datasets import read_csv_rows
from engine.training.splits import SplitLeakError, check_no_patient_leak, grouped_splits, leaked_patients, patients_by_split


def test_checker_catches_a_leak_and_does_not_name_the_patient():
    rows = [{"patient_id": "p1", "split": "train"}, {"patient_id": "p2", "split": "val"},
            {"patient_id": "p1", "split": "test"}]
    assert leaked_patients(rows) == {"p1": {"train", "test"}}
    with pytest.raises(SplitLeakError) as e:
        check_no_patient_leak(rows)
    assert "p1" not in str(e.value)
    check_no_patient_leak(rows[:2])


@pytest.mark.parametrize("csv_rel", ["xray/labels.csv", "ct/slices.csv"])
def test_shared_data_splits_are_patient_level(shared_data, csv_rel):
    rows = read_csv_rows(shared_data / csv_rel)
    check_no_patient_leak(rows)
    by = patients_by_split(rows)
    assert {"train", "val"} <= set(by)
    splits = list(by)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not (by[a] & by[b])


def test_grouped_splits_keep_patients_whole():
    rs = np.random.RandomState(0)
    groups = [f"p{rs.randint(0, 30)}" for _ in range(120)]
    n = 0
    for tr, te in grouped_splits(groups, 20, 0.2, seed=3):
        n += 1
        assert len(tr) + len(te) == len(groups) and len(te) > 0
        assert not ({groups[i] for i in tr} & {groups[i] for i in te})
    assert n == 20
