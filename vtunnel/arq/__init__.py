"""vtunnel.arq: the sans-IO ARQ layer, beside ``protocol`` and ``security`` and under the same rules: datagrams
and ``now`` in; datagrams, delivered bytes and the next deadline out; no sockets, clock reads, sleeps or logging.

``kcp_engine`` (the one adapter of the C ikcp, through siokcp), ``pacing`` (the delivery-rate pacer),
``kcp_wire`` (KCP segment parsing), ``kcp_options`` (session configuration). The transports drive them.
"""
