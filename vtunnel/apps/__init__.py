"""vtunnel.apps"""
