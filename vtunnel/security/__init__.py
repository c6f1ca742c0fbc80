"""vtunnel.security"""
