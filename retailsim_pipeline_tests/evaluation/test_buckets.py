"""The evaluation buckets: labels and bucketing derived from one definition each."""

import numpy as np

from retailsim_pipeline.evaluation.buckets import COLD_START_BUCKETS, bucket_cold_start


def test_labels_in_report_order():
    assert COLD_START_BUCKETS == ("anonymous", "0", "1-2", "3-9", "10+")


def test_every_trip_count_falls_into_its_bucket():
    trips = np.array([0, 1, 2, 3, 9, 10, 250, 4, 0])
    carded = np.array([True, True, True, True, True, True, True, False, False])
    expected = ["0", "1-2", "1-2", "3-9", "3-9", "10+", "10+", "anonymous", "anonymous"]
    assert bucket_cold_start(trips, carded).tolist() == expected
    assert bucket_cold_start(np.zeros(0, np.int64), np.zeros(0, bool)).tolist() == []


def test_basket_lengths_fall_into_the_shared_ladder():
    from retailsim_pipeline.config import BASKET_LENGTH_EDGES, EVALUATION_LENGTH_EDGES
    from retailsim_pipeline.evaluation.buckets import LENGTH_BUCKETS, bucket_length

    assert set(EVALUATION_LENGTH_EDGES) <= set(BASKET_LENGTH_EDGES)  # one ladder, pooled at the top
    assert LENGTH_BUCKETS == ("2-4", "5-9", "10-19", "20-50")
    lengths = np.array([2, 4, 5, 9, 10, 19, 20, 49, 50])
    assert bucket_length(lengths).tolist() == ["2-4", "2-4", "5-9", "5-9", "10-19", "10-19", "20-50", "20-50",
                                               "20-50"]


def test_repeat_and_explore_and_the_groups_of_metrics_json():
    from retailsim_pipeline.evaluation.buckets import BUCKET_GROUPS, bucket_repeat
    from retailsim_pipeline.evaluation.schema import BUCKETS

    assert bucket_repeat(np.array([True, False])).tolist() == ["repeat", "explore"]
    assert BUCKETS is BUCKET_GROUPS and list(BUCKETS) == ["cold_start", "basket_length", "repeat_vs_explore"]
