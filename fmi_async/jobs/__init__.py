"""Jobs: one job at a time per communicator name and run id (``docs/jobs.md``).

* :mod:`.record` -- the lease record and its transitions, sans-IO (the
  rendezvous server's lease table uses it too, so it imports nothing above
  the errors);
* :mod:`.base` -- :class:`~.base.JobLease`, what every backend's lease shares;
* :mod:`.rendezvous` -- the lease held by the rendezvous server (tcp, udp);
* :mod:`.store` and :mod:`.stores` -- the lease over conditional writes, and
  the Redis, S3 and DynamoDB records it writes;
* :mod:`.lease` -- :func:`~.lease.lease_for`, which picks the backend.

This file imports nothing, so that the record can be read from below.
"""
