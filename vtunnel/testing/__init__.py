"""vtunnel.testing"""
