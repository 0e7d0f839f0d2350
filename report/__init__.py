"""`ps-plot`: turn the metrics of runs and sweeps into the paper's figures and tables."""
