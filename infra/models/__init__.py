"""Models: loading, teacher-forced forward, sampling primitives and the one decode loop, teacher scoring."""
