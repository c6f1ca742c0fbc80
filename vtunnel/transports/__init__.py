"""vtunnel.transports"""
