"""Datasets: readers (Ray Data), image decoding, synthetic scenes and bundled photos."""
