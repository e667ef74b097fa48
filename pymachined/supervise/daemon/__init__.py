"""pymachined, the builtin supervisor for hosts without systemd as PID 1
(``python -m pymachined.supervise.daemon``): ``server`` (the socket and the
event loop), ``launcher`` (nspawn, the log stamper, pidfds, adoption),
``policy`` (restart decisions, pure) and ``store`` (the records on disk).
Machines are started in their own sessions and outlive pymachined.
"""
