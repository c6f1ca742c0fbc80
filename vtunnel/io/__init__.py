"""vtunnel.io: the one home of event-loop I/O.

The only code that works on file descriptors directly: the lean TCP socket transport, its epoll watcher and
relay listener (:mod:`.stream_sockets`), batched UDP I/O (:mod:`.datagrams`), socket options
(:mod:`.tuning`), and what a program does when the kernel runs out of descriptors or buffers (:mod:`.limits`).
It imports nothing else of vtunnel; transports, the runtime and the applications build on it.
"""
