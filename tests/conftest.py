import os

# Before torch loads OpenMP: spin-waiting threads made small solver calls 10-30x slower
# whenever another process was busy on this 2-core machine (see bench/solvers.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
