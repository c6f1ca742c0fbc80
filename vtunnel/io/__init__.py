"""vtunnel.io: the one home of event-loop I/O.

The only code that works on file descriptors directly: the lean TCP socket transport, its epoll watcher and
relay listener and outgoing connections (:mod:`.stream_sockets`), batched UDP I/O (:mod:`.datagrams`), listening
sockets and a supervisor's ``SO_REUSEPORT`` groups (:mod:`.listening`), socket options (:mod:`.tuning`), the
kernel's relaying (:mod:`.splice`), per-worker steering (:mod:`.steering`), the TUN device (:mod:`.tun`), the
blocking waits of code outside an event loop (:mod:`.blocking`), and what a program does when the kernel runs out
of descriptors or buffers (:mod:`.limits`). ``tests/io/test_io_home.py`` checks that no other package does these.
It imports nothing else of vtunnel; transports, the runtime and the applications build on it.
"""
