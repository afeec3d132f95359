"""The MPI channel under a real ``mpiexec``: scripts run by the launcher
(``suite.py``, ``scenarios.py``, ``same_script.py``) and the pytest module that
launches them (``test_mpi.py``)."""
