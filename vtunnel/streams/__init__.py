"""vtunnel.streams"""
