"""Imported, for its effect, by the forkserver that starts a rank's DataLoader workers (load_data_kwargs.worker_start):
the server and every worker it forks ignore the stop signals.

Slurm signals every process of a job step (USR2 before the time limit, TERM on scancel and preemption). A worker
killed by one crashes the rank that is busy writing its checkpoint, and a killed forkserver makes every worker it
started look dead to the rank ("DataLoader worker exited unexpectedly"). The rank decides when to stop and shuts its
workers down itself; the server ends when the rank does (multiprocessing closes its pipe).
"""
import signal

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


ignore_stop_signals()
