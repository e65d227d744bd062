"""The training-curve plot (used by the training run's artifacts and the HTML report)."""

from retailsim_pipeline.training.curves import write_training_curves


def test_training_curves_tolerate_gaps(tmp_path):
    path = write_training_curves(
        [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": float("inf"), "val/loss": 2.0}, {"x": "a"}],
        tmp_path / "sub" / "c.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert write_training_curves([], tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()
