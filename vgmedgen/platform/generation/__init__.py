"""Generation: what to sample (requests, swap grids), sampling a loaded model, and writing the results."""
