"""Cold-start buckets: labels and bucketing derived from the one list of edges."""

import numpy as np

from retailsim_pipeline.evaluation.cold_start import COLD_START_BUCKETS, bucket_cold_start


def test_labels_in_report_order():
    assert COLD_START_BUCKETS == ("anonymous", "0", "1-2", "3-9", "10+")


def test_every_trip_count_falls_into_its_bucket():
    trips = np.array([0, 1, 2, 3, 9, 10, 250, 4, 0])
    carded = np.array([True, True, True, True, True, True, True, False, False])
    expected = ["0", "1-2", "1-2", "3-9", "3-9", "10+", "10+", "anonymous", "anonymous"]
    assert bucket_cold_start(trips, carded).tolist() == expected
    assert bucket_cold_start(np.zeros(0, np.int64), np.zeros(0, bool)).tolist() == []
