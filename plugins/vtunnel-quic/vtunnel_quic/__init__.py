"""quic:// transport for vtunnel: one tunnel per QUIC connection, on its first bidirectional stream."""
