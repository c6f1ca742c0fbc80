"""vtunnel.protocol"""
