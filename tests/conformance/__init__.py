"""Conformance of sshd-adopt with the real pam_slurm_adopt (issue #6).

Pure code, no pytest and no lab: the scenario matrix with the EXPECTED verdict per row
(``matrix``), the normalised observation of one login and the comparison that computes the
ACTUAL verdict (``model``), and the Markdown report (``report``). The pytest glue that drives
the lab lives in ``tests/integration/test_conformance.py``; keeping the two apart lets the
verdict logic and the report be unit-tested and re-rendered without a cluster.
"""
