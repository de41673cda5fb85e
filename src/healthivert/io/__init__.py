"""Reading and writing: NIfTI volumes, dataset layouts, centroids, grades, atomic outputs."""
