"""The ``fmi`` command and its subcommands: tools above the communicator.

Every module here may import anything of the package; nothing below
(``selection``, ``channels``, the communicator) imports this package.

``cli``           the ``fmi`` entry point and its table of subcommands
``launcher``      ``fmi run``: N peers of a script on this machine
``rendezvous``    ``fmi rendezvous``: a rendezvous server until Ctrl-C
``calibrate``     ``fmi calibrate``: measure the channels (``calibration``: fit, write)
``plan_report``   ``fmi plan``: predicted time and cost of every plan (``plot``: PNG)
``cost_report``   ``fmi cost``: price saved ``comm.stats()``
``clean``         ``fmi clean``: remove what runs left on storage
``units``, ``tables``, ``progress``: sizes, plain-text tables, progress bars
"""
