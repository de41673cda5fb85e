"""Grading new scans: the grader bundle (everything a trained pipeline needs) and the per-case grading path."""
