"""ws:// transport for vtunnel."""
