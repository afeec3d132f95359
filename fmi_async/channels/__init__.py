"""Channels: one module per way of moving data between peers.

:mod:`.registry` lists the channels that exist; :mod:`.base` holds the
interfaces every channel implements (:class:`~.base.DirectChannel`,
:class:`~.base.MediatedChannel`) and the :class:`~.base.ChannelContext` they
are built from; :mod:`.options` parses each backend's config section;
:mod:`.mailbox` is where direct channels deliver.  This package file imports
nothing, so that the config (below the channels) may read the registry.
"""
