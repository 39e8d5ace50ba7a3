"""Analysis of the runs that training logged: runs.py reads MLflow into typed pandas frames (the only
reader of MLflow), figures.py turns frames into matplotlib figures (pure), report.py writes
results/<study>/ and results/REPORT.md (`bnlab-report`)."""
