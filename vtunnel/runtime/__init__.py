"""vtunnel.runtime"""
