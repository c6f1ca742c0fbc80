"""rudp: vtunnel's own reliable-UDP ARQ, sans-IO (``docs/rudp.md`` has the wire format).

``wire`` (packets and frames), ``ranges`` (interval sets), ``recovery`` (RTT, loss detection, PTO, ACK
tracking: RFC 9002), ``cc`` (NewReno, CUBIC, a BBR-style delivery-rate model, the pacer), ``pmtu`` (path MTU
discovery: RFC 8899), ``connection`` (the :class:`~vtunnel.arq.rudp.connection.Connection` a transport drives:
datagrams and ``now`` in; datagrams, bytes, events and the next deadline out).
"""
