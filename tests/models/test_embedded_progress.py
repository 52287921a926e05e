"""The embedded build's progress lines: elapsed time and the time left at the measured rate."""

from posttrain.models.embedded import progress_timing


def test_time_left_is_extrapolated_from_the_measured_rate():
    assert progress_timing(500, 1000, 40.0) == " (40 s, about 40 s left at this rate)"
    assert progress_timing(100, 1000, 12.0) == " (12 s, about 1.8 min left at this rate)"
    assert progress_timing(100, 1000, 60.0) == " (60 s, about 9.0 min left at this rate)"


def test_the_last_step_reports_the_elapsed_time_only():
    assert progress_timing(1000, 1000, 86.4) == " (86 s)"
